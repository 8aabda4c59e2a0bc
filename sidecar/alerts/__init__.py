"""Alerts: the policy's `alerts:` rules, evaluated every few seconds off the request path.

engine.py keeps each alert's state (pending, firing) and decides what to send;
formats.py writes a notification in a receiver's format; the notifications go
through the durable webhook queue (webhooks/), so a crash loses none.
"""
