"""
Identities: C{dwtrust keygen} and C{show} (C{connect}, C{pin} and C{forget}
are in L{dwtrust.cli._connect}).
"""

from __future__ import annotations

import json
from typing import TextIO

from twisted.python import usage

from .._identity import SHORT_NAMES, Identity
from ._common import OK, CommandError, _IdentityOptions


class KeygenOptions(_IdentityOptions):
    synopsis = "[options] --org ORG --service NAME"
    optFlags = [["json", None, "Print JSON."]]
    optParameters = [
        *_IdentityOptions.optParameters,
        ["org", "o", None, "The organization name."],
        ["service", "s", None, "The service name."],
        [
            "algorithm",
            "a",
            "ed25519",
            "One of " + ", ".join(sorted(SHORT_NAMES)) + ".",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        for name in ["org", "service"]:
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")


class ShowOptions(_IdentityOptions):
    synopsis = "[options]"
    optFlags = [["json", None, "Print JSON."]]


def describe(identity: Identity) -> dict[str, str]:
    return {
        "organization": identity.org,
        "service": identity.service,
        "algorithm": identity.algorithm.name,
        "fingerprint": identity.fingerprint,
        "publicKey": identity.publicKey.openssh(identity.name),
    }


def _printIdentity(identity: Identity, asJSON: bool, out: TextIO) -> None:
    facts = describe(identity)
    if asJSON:
        out.write(json.dumps(facts, indent=2) + "\n")
        return
    labels = {"publicKey": "public key"}
    width = max(len(labels.get(k, k)) for k in facts) + 1
    for key, value in facts.items():
        out.write(f"{(labels.get(key, key) + ':'):<{width + 1}}{value}\n")


def keygen(options: KeygenOptions, out: TextIO) -> int:
    if options.directory.child("id_dwtrust").exists():
        raise CommandError(f"{options.directory.path} already holds an identity")
    identity = Identity.generate(
        options["org"], options["service"], options["algorithm"]
    )
    identity.save(options.directory)
    _printIdentity(identity, options["json"], out)
    return OK


def show(options: ShowOptions, out: TextIO) -> int:
    _printIdentity(Identity.load(options.directory), options["json"], out)
    return OK
