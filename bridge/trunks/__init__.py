"""SIP trunks on the PBX, kept equal to the directory's (the trunk reconciler)."""
