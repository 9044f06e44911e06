"""Test and demo lab: a real Asterisk in a chroot, SIPp callers/callees, Python RTP peers.

Nothing here is used by the daemon at run time; it exists so tests and the demo exercise the
real PBX instead of mocks (see docs/asterisk-ari-notes.md for what was measured with it).
"""

from bridge.lab.asterisk import AsteriskLab, LabError, LabUnavailable
from bridge.lab.rtp import RtpPeer, dominant_frequency, rms, speech_like
from bridge.lab.sipp import SipMessage, SippCall, SippError, SippUas

__all__ = [
    "AsteriskLab",
    "LabError",
    "LabUnavailable",
    "RtpPeer",
    "SipMessage",
    "SippCall",
    "SippError",
    "SippUas",
    "dominant_frequency",
    "rms",
    "speech_like",
]
