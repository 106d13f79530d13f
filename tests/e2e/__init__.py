"""End-to-end tests: the CLI as a user runs it, with the built-in demo model."""
