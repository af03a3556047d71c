"""Shipped device profiles (TOML data; fields in README.md), read by runtime.device_profile."""
