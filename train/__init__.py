"""The training tool: entry points (``main``, ``summary``, ``prepare_data``) and their library."""
