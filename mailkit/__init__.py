"""Leaf modules of emailsvc: protocols, parsing, secrets, settings, logs.

Nothing here imports the service (emailsvc, tasks, models); callers pass in
what a function needs.
"""
