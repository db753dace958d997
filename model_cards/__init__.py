"""Model-card templates, installed as the `not_hub.model_cards` package (see setup.cfg `package_dir`)."""
