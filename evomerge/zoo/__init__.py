"""Tiny models made on this machine: pico test models and the trained zoo family."""
