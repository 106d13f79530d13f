"""Byte sizes written with units ('2GiB', '512MB'): the one parser, torch-free so the CLI's --help stays fast."""

import re

# Size units, case-insensitive: K/M/G/T (with or without a trailing B) are decimal (1 KB = 1000 bytes),
# Ki/Mi/Gi/Ti (with or without a trailing B) are binary (1 KiB = 1024 bytes); no unit or B is bytes.
_UNITS = {"": 1, "b": 1}
for _power, _prefix in enumerate("kmgt", start=1):
    for _suffix in ("", "b"):
        _UNITS[_prefix + _suffix] = 1000**_power
        _UNITS[_prefix + "i" + _suffix] = 1024**_power

MEMORY_UNITS_HELP = "K/M/G/T (or KB/MB/GB/TB) are decimal, Ki/Mi/Gi/Ti (or KiB/MiB/GiB/TiB) are binary"


def parse_memory(value: str | int | float) -> int:
    """Bytes from an int or a size such as '2GiB' (2 * 1024**3), '2GB' or '2G' (2 * 1000**3), '1e9'."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"kv_cache_memory must be bytes or a size like '2GiB' or '512MB' ({MEMORY_UNITS_HELP}), got {value!r}"
        )
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if nbytes <= 0:
        raise ValueError(f"kv_cache_memory must be positive, got {value!r}")
    return nbytes
