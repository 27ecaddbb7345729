"""Marshmallow schemas for every request body, instantiated once per module."""
