"""notes-api: a small FastAPI notes service, the app-level example of pytest-pgtemplate."""
