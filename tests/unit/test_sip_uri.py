"""The SIP URI grammar (bridge.sip): what a dialplan or a request router would interpret is
refused, at every entry point that validates a destination."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from bridge.api.schemas import DestinationTestRequest
from bridge.calls.model import TransferCommand
from bridge.directory.models import SipDestination
from bridge.sip import (
    SIP_URI_PATTERN,
    SipUri,
    check_uri_syntax,
    configure_uri_params,
    parse_sip_uri,
)

# Issue 7's reproductions, and their cousins: each must be refused.
FORGED = [
    "sip:x&Local/+19005550206,,,@pbx.example.com",  # forks Dial() into a Local channel
    "sip:x&PJSIP/+19005550206@cb-trunk-abc",  # forks Dial() onto any endpoint
    "sip:+19005550204@pbx.example.com:5060;maddr=203.0.113.7",  # routes past the host
    "sip:+19005550204@pbx.example.com;transport=tcp",
    "sip:+19005550204@pbx.example.com;lr",
    "sip:+19005550204@pbx.example.com;MADDR=203.0.113.7",
    "sip:a@pbx.example.com?Route=%3Csip:evil%3E",  # headers
    "sip:a@pbx.example.com;user=phone?x=y",
    "sip:x,30,D(1)@pbx.example.com",
    "sip:x(y)@pbx.example.com",
    "sip:$(SHELL)@pbx.example.com",
    "sip:x^y@pbx.example.com",
    "sip:x|y@pbx.example.com",
    "sip:x/y@pbx.example.com",
    "sip:x y@pbx.example.com",
    "sip:x\t@pbx.example.com",
    "sip:x;y=z@pbx.example.com",
    "sip:x?y@pbx.example.com",
    "sip:x=y@pbx.example.com",
    "sip:alice:secret@pbx.example.com",  # password in the user info
    "sip:a%26Local@pbx.example.com",  # %-escape of '&'
    "sip:a%2C@pbx.example.com",  # of ','
    "sip:a%20b@pbx.example.com",  # of a space
    "sip:a%00@pbx.example.com",  # of NUL
    "sip:a%zz@pbx.example.com",  # malformed escape
    "sip:@pbx.example.com",
    "sip:a@",
    "sip:a@pbx..example.com",
    "sip:a@pbx.example.com.",
    "sip:a@-pbx.example.com",
    "sip:a@256.1.1.1",
    "sip:a@pbx.example.com:0",
    "sip:a@pbx.example.com:65536",
    "sip:a@pbx.example.com:50x",
    "sip:a@[::1",
    "sip:a@[zz::1]",
    "sip:a@b@pbx.example.com",
    "sip:a@pbx.example.com;user=phone;user=phone",
    "sip:a@pbx.example.com;user=ip",
    "tel:+31612345678",
    "SIP:alice@pbx.example.com",
    "sip:é@pbx.example.com",
    "sip:" + "a" * 65 + "@pbx.example.com",
]

GOOD = [
    "sip:alice@pbx.example.com",
    "sips:alice@pbx.example.com:5061",
    "sip:+31612345678@203.0.113.7",
    "sip:+31612345678@pbx.example.com;user=phone",
    "sip:alice.o'neil_1-2!~*@pbx.example.com",
    "sip:%23100@pbx.example.com",  # an escaped '#'
    "sip:bob@[2001:db8::1]:5070",
    "sip:pbx.example.com",
    "sip:alice@PBX.Example.COM",
]


@pytest.fixture(autouse=True)
def _no_configured_params() -> Iterator[None]:
    configure_uri_params([])
    yield
    configure_uri_params([])


@pytest.mark.parametrize("uri", FORGED)
def test_forged_uris_are_refused_by_the_grammar(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_sip_uri(uri)


@pytest.mark.parametrize("uri", FORGED)
def test_every_entry_point_refuses_forged_uris(uri: str) -> None:
    """The control API, the destination test and stored assistant destinations."""
    with pytest.raises(ValidationError):
        TransferCommand(type="transfer", destination=uri)
    with pytest.raises(ValidationError):
        DestinationTestRequest(destination=uri)
    with pytest.raises(ValidationError):
        SipDestination(type="sip", sip_uri=uri, description="d")


@pytest.mark.parametrize("uri", GOOD)
def test_plain_uris_pass_every_entry_point(uri: str) -> None:
    parse_sip_uri(uri)
    assert TransferCommand(type="transfer", destination=uri).destination == uri
    assert DestinationTestRequest(destination=uri).destination == uri
    assert SipDestination(type="sip", sip_uri=uri, description="d").sip_uri == uri
    assert SIP_URI_PATTERN.match(uri)


def test_parsed_parts_host_is_lower_cased() -> None:
    assert parse_sip_uri("sip:Alice@PBX.Example.COM:5070;user=phone") == SipUri(
        "sip", "Alice", "pbx.example.com", 5070, (("user", "phone"),)
    )
    assert parse_sip_uri("sip:pbx.example.com").user is None
    assert str(parse_sip_uri("sip:a@h:5;user=phone")) == "sip:a@h:5;user=phone"


def test_routing_parameters_need_an_explicit_setting() -> None:
    uri = "sip:a@pbx.example.com;transport=tcp"
    with pytest.raises(ValueError, match="allowed_uri_params"):
        parse_sip_uri(uri)
    assert parse_sip_uri(uri, allowed_params=["transport"]).params == (("transport", "tcp"),)
    with pytest.raises(ValueError):  # allowing one does not allow the others
        parse_sip_uri(uri + ";maddr=203.0.113.7", allowed_params=["transport"])
    # The setting reaches the validators that cannot see the settings (API, stored config).
    configure_uri_params(["transport"])
    assert TransferCommand(type="transfer", destination=uri).destination == uri
    configure_uri_params([])
    with pytest.raises(ValidationError):
        TransferCommand(type="transfer", destination=uri)


def test_control_characters_are_refused_by_the_grammar() -> None:
    for uri in ("sip:a@pbx.example.com\n", "sip:a@pbx.example.com\r\nX: y", "sip:a\x00@h"):
        with pytest.raises(ValueError):
            parse_sip_uri(uri)


def test_adapters_syntax_check_accepts_any_well_formed_parameter_only() -> None:
    check_uri_syntax("sip:a@h;maddr=203.0.113.7;transport=tcp")
    for bad in ("sip:x&Local/1@h", "sip:a@h;x=a,b", "sip:a@h?x=y", "sip:a@h;x=(y)"):
        with pytest.raises(ValueError):
            check_uri_syntax(bad)
