"""Generations: create, read, list, delete."""
