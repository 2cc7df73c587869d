"""An OpenAI-compatible NGSD server: the slot engine, the decode loop, the web app."""
