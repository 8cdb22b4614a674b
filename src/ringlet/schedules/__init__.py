"""Collective algorithms as schedules: plain data the engine executes and the tests replay."""
