"""Adapters that let other frameworks checkpoint through the engine."""
