"""params.yaml as validated pydantic models, one module per section (a library takes only its own
section); `config.params` holds the whole `Params` and is the only reader of params.yaml."""
