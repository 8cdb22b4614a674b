"""Rendezvous: how the ranks of a job find each other (environment, authenticated store)."""

from ringlet.rendezvous.env import JobEnv, resolve
from ringlet.rendezvous.store import KeyValueStore, PrefixStore, Store, StoreServer

__all__ = ["JobEnv", "KeyValueStore", "PrefixStore", "Store", "StoreServer", "resolve"]
