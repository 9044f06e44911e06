"""Tests against the real Asterisk lab (bridge.lab). The `asterisk_lab` fixture lives in
tests/conftest.py, shared with the two-PBX behaviour suite (tests/behaviour/)."""
