"""Optional integrations (timm, Ultralytics), each imported lazily by its own module."""
