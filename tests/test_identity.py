"""
Tests for L{dwtrust._identity}: key generation, saving and loading, names,
fingerprints and the parsing of public keys received from peers.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import Identity, IdentityError, PublicKey
from dwtrust._identity import (
    ALGORITHMS,
    IDENTITY_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    _sshString,
    validateName,
)

from .helpers import ALGORITHMS as SHORT_NAMES
from .helpers import makeIdentity, privateKey, temporaryDirectory

SSH_KEYGEN = "/usr/bin/ssh-keygen"


def mode(path: FilePath[str]) -> int:
    return stat.S_IMODE(os.stat(path.path).st_mode)


def blobOf(algorithm: str, slot: str = "blob") -> bytes:
    return makeIdentity("acme", "billing", algorithm, slot).publicKey.blob


def sshKeygen(*arguments: str) -> str:
    """
    Run the real C{ssh-keygen}; its absence is a failure, not a skip.
    """
    result = subprocess.run(
        [SSH_KEYGEN, *arguments], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"ssh-keygen {arguments} failed: {result.stderr}")
    return result.stdout


class GenerateTests(SynchronousTestCase):
    """
    L{Identity.generate} makes a fresh key of each accepted algorithm.
    """

    def test_eachAlgorithm(self) -> None:
        """
        Each command-line algorithm name gives a key of that type, with the
        wire algorithm name that goes with it.
        """
        expected = {
            "ed25519": ("ssh-ed25519", ed25519.Ed25519PrivateKey),
            "ecdsa-p256": ("ecdsa-sha2-nistp256", ec.EllipticCurvePrivateKey),
            "ecdsa-p384": ("ecdsa-sha2-nistp384", ec.EllipticCurvePrivateKey),
            "rsa-3072": ("rsa-sha2-256", rsa.RSAPrivateKey),
        }
        self.assertEqual(set(expected), set(SHORT_NAMES))
        for shortName, (wireName, keyType) in expected.items():
            identity = Identity.generate("acme", "billing", shortName)
            self.assertEqual(identity.algorithm.name, wireName)
            self.assertIsInstance(identity.privateKey, keyType)
            self.assertEqual((identity.org, identity.service), ("acme", "billing"))
            self.assertEqual(identity.name, "acme/billing")
        p256 = Identity.generate("acme", "billing", "ecdsa-p256").privateKey
        p384 = Identity.generate("acme", "billing", "ecdsa-p384").privateKey
        assert isinstance(p256, ec.EllipticCurvePrivateKey)
        assert isinstance(p384, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(p256.curve, ec.SECP256R1)
        self.assertIsInstance(p384.curve, ec.SECP384R1)

    def test_rsaSize(self) -> None:
        """
        C{rsa-3072} means a 3072-bit modulus.
        """
        key = makeIdentity(algorithm="rsa-3072").privateKey
        assert isinstance(key, rsa.RSAPrivateKey)
        self.assertEqual(key.key_size, 3072)

    def test_defaultIsEd25519(self) -> None:
        self.assertEqual(
            Identity.generate("acme", "billing").algorithm.name, "ssh-ed25519"
        )

    def test_freshKeys(self) -> None:
        """
        Two identities generated with the same names have different keys.
        """
        first = Identity.generate("acme", "billing")
        second = Identity.generate("acme", "billing")
        self.assertNotEqual(first.fingerprint, second.fingerprint)

    def test_unknownAlgorithm(self) -> None:
        e = self.assertRaises(
            IdentityError, Identity.generate, "acme", "billing", "dsa"
        )
        self.assertIn("unknown algorithm 'dsa'", str(e))
        self.assertIn("ed25519", str(e))

    def test_signAndVerify(self) -> None:
        """
        An identity's signatures verify with its public key, and only over the
        data signed.
        """
        for algorithm in SHORT_NAMES:
            identity = makeIdentity(algorithm=algorithm)
            signature = identity.sign(b"payload")
            self.assertTrue(identity.publicKey.verify(signature, b"payload"))
            self.assertFalse(identity.publicKey.verify(signature, b"payloaD"))

    def test_privateKeyNotInRepr(self) -> None:
        """
        Neither the identity's C{repr} nor its public key's shows the private
        key.
        """
        identity = makeIdentity()
        text = repr(identity) + str(identity) + repr(identity.publicKey)
        self.assertNotIn("PrivateKey", text)
        self.assertNotIn("privateKey", text)
        self.assertIn(identity.fingerprint, repr(identity.publicKey))


class SaveLoadTests(SynchronousTestCase):
    """
    L{Identity.save} and L{Identity.load}.
    """

    def directory(self) -> FilePath[str]:
        """
        A directory path that does not exist yet.
        """
        return temporaryDirectory(self).child("identity")

    def test_roundTrip(self) -> None:
        """
        What is saved loads back the same, for every algorithm, and the loaded
        key signs what the saved public key verifies.
        """
        for algorithm in SHORT_NAMES:
            identity = makeIdentity("acme", "ledger", algorithm)
            directory = self.directory()
            identity.save(directory)
            loaded = Identity.load(directory)
            self.assertEqual(loaded, identity)
            self.assertEqual(loaded.fingerprint, identity.fingerprint)
            self.assertEqual(loaded.algorithm, identity.algorithm)
            self.assertTrue(identity.publicKey.verify(loaded.sign(b"x"), b"x"))

    def test_files(self) -> None:
        """
        The directory holds the private key, the OpenSSH public-key line with
        the identity's name as its comment, and the description; nothing else.
        """
        identity = makeIdentity()
        directory = self.directory()
        identity.save(directory)
        self.assertEqual(
            sorted(directory.listdir()),
            sorted([PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, IDENTITY_FILE]),
        )
        self.assertEqual(
            directory.child(PUBLIC_KEY_FILE).getContent(),
            (identity.publicKey.openssh("acme/billing") + "\n").encode(),
        )
        self.assertTrue(
            directory.child(PRIVATE_KEY_FILE)
            .getContent()
            .startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        )

    def test_modes(self) -> None:
        """
        The private key file is 0600 and the directory made for it 0700, even
        with a umask that would leave them open.
        """
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        directory = self.directory()
        makeIdentity().save(directory)
        self.assertEqual(mode(directory.child(PRIVATE_KEY_FILE)), 0o600)
        self.assertEqual(mode(directory), 0o700)
        self.assertEqual(mode(directory.child(PUBLIC_KEY_FILE)) & 0o022, 0)
        self.assertEqual(mode(directory.child(IDENTITY_FILE)) & 0o022, 0)

    def test_neverOverwrites(self) -> None:
        """
        Saving into a directory that already holds an identity fails with
        L{IdentityError} and leaves the files there untouched.
        """
        directory = self.directory()
        first = makeIdentity("acme", "billing")
        first.save(directory)
        before = {
            name: directory.child(name).getContent() for name in directory.listdir()
        }
        second = makeIdentity("acme", "ledger")
        e = self.assertRaises(IdentityError, second.save, directory)
        self.assertIn("already holds an identity", str(e))
        after = {
            name: directory.child(name).getContent() for name in directory.listdir()
        }
        self.assertEqual(after, before)
        self.assertEqual(Identity.load(directory), first)

    def test_noTemporaryFilesLeft(self) -> None:
        """
        After a save, and after a save that fails part way, no temporary file
        is left in the directory.
        """
        directory = self.directory()
        makeIdentity().save(directory)
        self.assertEqual(len(directory.listdir()), 3)

        broken = self.directory()
        broken.makedirs()
        # A directory where the public key file should go: the final rename
        # of its temporary file fails.
        broken.child(PUBLIC_KEY_FILE).makedirs()
        self.assertRaises(IdentityError, makeIdentity().save, broken)
        self.assertEqual([name for name in broken.listdir() if ".tmp" in name], [])

    def test_failedSaveLeavesNoIdentity(self) -> None:
        """
        A save that fails part way (here: the public key cannot be written)
        leaves no half identity behind, that could neither be loaded nor be
        replaced: once the cause is gone, saving again works.
        """
        directory = self.directory()
        directory.makedirs()
        obstacle = directory.child(PUBLIC_KEY_FILE)
        obstacle.makedirs()
        identity = makeIdentity()
        self.assertRaises(IdentityError, identity.save, directory)
        obstacle.remove()
        identity.save(directory)
        self.assertEqual(Identity.load(directory), identity)

    def test_loadRefusesReadableKey(self) -> None:
        """
        A private key that its group or anyone else can read, write or run is
        refused, with a message saying how to fix it.
        """
        for badMode in [0o640, 0o604, 0o660, 0o644, 0o610, 0o601]:
            directory = self.directory()
            makeIdentity().save(directory)
            directory.child(PRIVATE_KEY_FILE).chmod(badMode)
            e = self.assertRaises(IdentityError, Identity.load, directory)
            self.assertIn(f"{badMode:04o}", str(e))
            self.assertIn("chmod 600", str(e))

    def test_loadOwnerOnlyModes(self) -> None:
        """
        0400 is as good as 0600.
        """
        directory = self.directory()
        identity = makeIdentity()
        identity.save(directory)
        directory.child(PRIVATE_KEY_FILE).chmod(0o400)
        self.assertEqual(Identity.load(directory), identity)

    def test_loadMissing(self) -> None:
        directory = self.directory()
        directory.makedirs()
        e = self.assertRaises(IdentityError, Identity.load, directory)
        self.assertIn("no identity", str(e))

    def test_loadInconsistentAlgorithm(self) -> None:
        """
        A description naming another algorithm than the key's is refused.
        """
        directory = self.directory()
        makeIdentity().save(directory)
        description = directory.child(IDENTITY_FILE)
        description.setContent(
            description.getContent().replace(b"ssh-ed25519", b"rsa-sha2-256")
        )
        e = self.assertRaises(IdentityError, Identity.load, directory)
        self.assertIn("rsa-sha2-256", str(e))

    def test_loadOrCreate(self) -> None:
        """
        C{loadOrCreate} makes an identity the first time and loads it after,
        and refuses names that differ from the stored ones.
        """
        directory = self.directory()
        created, isNew = Identity.loadOrCreate(directory, "acme", "billing")
        self.assertTrue(isNew)
        loaded, isNew = Identity.loadOrCreate(directory, "acme", "billing")
        self.assertFalse(isNew)
        self.assertEqual(loaded, created)
        self.assertEqual(Identity.loadOrCreate(directory, None, None)[0], created)
        self.assertRaises(
            IdentityError, Identity.loadOrCreate, directory, "acme", "ledger"
        )
        self.assertRaises(
            IdentityError, Identity.loadOrCreate, self.directory(), None, None
        )


class NameTests(SynchronousTestCase):
    """
    Organization and service names are short, lower-case ASCII.
    """

    def assertRefused(self, name: str, *fragments: str) -> None:
        for kind in ["organization", "service"]:
            e = self.assertRaises(IdentityError, validateName, kind, name)
            self.assertIn(f"the {kind} name", str(e))
            for fragment in fragments:
                self.assertIn(fragment, str(e))
        self.assertRaises(IdentityError, Identity.generate, name, "billing")
        self.assertRaises(IdentityError, Identity.generate, "acme", name)
        key = privateKey("ed25519", "names")
        self.assertRaises(IdentityError, Identity.fromPrivateKey, name, "b", key)
        self.assertRaises(IdentityError, Identity.fromPrivateKey, "a", name, key)

    def test_empty(self) -> None:
        self.assertRefused("", "empty")

    def test_tooLong(self) -> None:
        self.assertRefused("a" * 64, "64 characters", "at most 63")

    def test_longest(self) -> None:
        name = "a" * 62 + "z"
        self.assertEqual(validateName("service", name), name)
        self.assertEqual(Identity.generate(name, name).org, name)

    def test_shortest(self) -> None:
        self.assertEqual(validateName("service", "a"), "a")
        self.assertEqual(validateName("service", "7"), "7")

    def test_allowedPunctuation(self) -> None:
        for name in ["billing-v2", "eu.billing", "billing_2", "a-b.c_d"]:
            self.assertEqual(validateName("service", name), name)

    def test_refusedCharacters(self) -> None:
        """
        Upper case, spaces, leading and trailing punctuation, slashes and
        anything outside ASCII are refused, each with a message that says
        what is allowed.
        """
        for name in [
            "Acme",
            "ACME",
            "ac me",
            " acme",
            "acme ",
            "-acme",
            "acme-",
            ".acme",
            "_acme",
            "acme/billing",
            "acme\\billing",
            "açme",
            "\u0430cme",  # Cyrillic a
            "acme\x00",
            "ac:me",
        ]:
            self.assertRefused(name, "not allowed", "lower-case letters")

    def test_newlines(self) -> None:
        """
        A name with a newline in it, anywhere, is refused: it would forge
        lines in logs and control messages, and C{acme} and C{"acme\\n"} would
        be two organizations.
        """
        for name in ["acme\n", "\nacme", "ac\nme", "acme\r\n", "acme\r"]:
            self.assertRefused(name, "not allowed")


class FingerprintTests(SynchronousTestCase):
    """
    Fingerprints and public-key lines are the ones OpenSSH shows.
    """

    def test_sshKeygenFingerprint(self) -> None:
        """
        The fingerprint equals what C{ssh-keygen -lf} prints for the saved
        public key file, for every algorithm.
        """
        for algorithm in SHORT_NAMES:
            identity = makeIdentity("acme", "billing", algorithm)
            directory = temporaryDirectory(self)
            identity.save(directory)
            output = sshKeygen("-lf", directory.child(PUBLIC_KEY_FILE).path)
            _bits, fingerprint, *rest = output.split()
            self.assertEqual(fingerprint, identity.fingerprint, algorithm)
            self.assertIn("acme/billing", rest)

    def test_sshKeygenReadsPrivateKey(self) -> None:
        """
        C{ssh-keygen -y} reads the saved private key file and derives the same
        public key as the saved one.
        """
        for algorithm in SHORT_NAMES:
            identity = makeIdentity("acme", "billing", algorithm)
            directory = temporaryDirectory(self)
            identity.save(directory)
            output = sshKeygen("-y", "-f", directory.child(PRIVATE_KEY_FILE).path)
            self.assertEqual(
                PublicKey.fromOpenSSH(output.strip()), identity.publicKey, algorithm
            )

    def test_format(self) -> None:
        identity = makeIdentity()
        self.assertTrue(identity.fingerprint.startswith("SHA256:"))
        self.assertNotIn("=", identity.fingerprint)
        self.assertEqual(len(identity.fingerprint), len("SHA256:") + 43)


class FromWireTests(SynchronousTestCase):
    """
    L{PublicKey.fromWire} accepts only a well-formed, canonically encoded key
    of the algorithm named.
    """

    def test_roundTrip(self) -> None:
        for algorithm in SHORT_NAMES:
            key = makeIdentity(algorithm=algorithm).publicKey
            parsed = PublicKey.fromWire(key.algorithm.name, key.blob)
            self.assertEqual(parsed, key)
            self.assertEqual(parsed.fingerprint, key.fingerprint)

    def test_algorithmMismatch(self) -> None:
        """
        A blob of one key type under another algorithm's name is refused.
        """
        for blobAlgorithm in SHORT_NAMES:
            blob = blobOf(blobAlgorithm)
            for name in ALGORITHMS:
                if ALGORITHMS[name].shortName == blobAlgorithm:
                    continue
                self.assertRaises(IdentityError, PublicKey.fromWire, name, blob)

    def test_curveMismatch(self) -> None:
        """
        An ECDSA blob whose key type says P-256 but whose curve and point are
        P-384 is refused.
        """
        blob384 = blobOf("ecdsa-p384")
        _, rest = blob384[: 4 + 19], blob384[4 + 19 :]
        forged = _sshString(b"ecdsa-sha2-nistp256") + rest
        self.assertRaises(
            IdentityError, PublicKey.fromWire, "ecdsa-sha2-nistp256", forged
        )

    def test_unsupportedAlgorithmNames(self) -> None:
        """
        SHA-1 RSA (C{ssh-rsa}), DSA and unknown names are refused.
        """
        rsaBlob = blobOf("rsa-3072")
        e = self.assertRaises(IdentityError, PublicKey.fromWire, "ssh-rsa", rsaBlob)
        self.assertIn("unsupported algorithm", str(e))
        self.assertRaises(IdentityError, PublicKey.fromWire, "ssh-dss", rsaBlob)
        self.assertRaises(IdentityError, PublicKey.fromWire, "", rsaBlob)

    def test_smallRSA(self) -> None:
        """
        RSA keys under 3072 bits are refused, by C{fromWire} and C{fromKey}.
        """
        small = rsa.generate_private_key(65537, 2048).public_key()
        line = small.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        blob = base64.b64decode(line.split()[1])
        e = self.assertRaises(IdentityError, PublicKey.fromWire, "rsa-sha2-256", blob)
        self.assertIn("3072", str(e))
        e = self.assertRaises(IdentityError, PublicKey.fromKey, small)
        self.assertIn("3072", str(e))
        self.assertIn("2048", str(e))
        self.assertRaises(IdentityError, PublicKey.fromOpenSSH, line)

    def test_trailingBytes(self) -> None:
        for algorithm in SHORT_NAMES:
            key = makeIdentity(algorithm=algorithm).publicKey
            for extra in [b"\x00", b"\x00\x00\x00\x00", _sshString(b"x")]:
                self.assertRaises(
                    IdentityError,
                    PublicKey.fromWire,
                    key.algorithm.name,
                    key.blob + extra,
                )

    def test_nonCanonicalMPInt(self) -> None:
        """
        An RSA key whose exponent is written with a needless leading zero
        byte is the same number but not the canonical blob: refused.
        """
        blob = blobOf("rsa-3072")
        keyType, offset = b"ssh-rsa", 4 + 7
        exponentLength = int.from_bytes(blob[offset : offset + 4], "big")
        exponent = blob[offset + 4 : offset + 4 + exponentLength]
        rest = blob[offset + 4 + exponentLength :]
        forged = _sshString(keyType) + _sshString(b"\x00" + exponent) + rest
        self.assertRaises(IdentityError, PublicKey.fromWire, "rsa-sha2-256", forged)

    def test_ed25519WrongLength(self) -> None:
        for point in [b"", b"\x01" * 31, b"\x01" * 33]:
            forged = _sshString(b"ssh-ed25519") + _sshString(point)
            self.assertRaises(IdentityError, PublicKey.fromWire, "ssh-ed25519", forged)

    def test_ecdsaPointNotOnCurve(self) -> None:
        forged = (
            _sshString(b"ecdsa-sha2-nistp256")
            + _sshString(b"nistp256")
            + _sshString(b"\x04" + b"\x01" * 64)
        )
        self.assertRaises(
            IdentityError, PublicKey.fromWire, "ecdsa-sha2-nistp256", forged
        )

    def test_ecdsaCompressedPoint(self) -> None:
        """
        A compressed elliptic-curve point (which cryptography does not load
        from OpenSSH blobs) is refused with L{IdentityError}, not with an
        exception the handshake does not expect.
        """
        blob = blobOf("ecdsa-p256")
        point = blob[-65:]
        compressed = bytes([2 + (point[-1] & 1)]) + point[1:33]
        forged = (
            _sshString(b"ecdsa-sha2-nistp256")
            + _sshString(b"nistp256")
            + _sshString(compressed)
        )
        self.assertRaises(
            IdentityError, PublicKey.fromWire, "ecdsa-sha2-nistp256", forged
        )

    def test_garbage(self) -> None:
        for blob in [b"", b"\x00", b"\x00\x00\x00", b"\xff\xff\xff\xff", b"garbage"]:
            for name in ALGORITHMS:
                self.assertRaises(IdentityError, PublicKey.fromWire, name, blob)

    @settings(max_examples=300, deadline=None)
    @given(
        name=st.sampled_from(sorted(ALGORITHMS)),
        keyType=st.sampled_from(
            [a.keyType.encode() for a in ALGORITHMS.values()] + [b"", b"ssh-dss"]
        ),
        rest=st.one_of(
            st.binary(max_size=600),
            # Well-framed strings, to get past the framing into the parsers.
            st.lists(
                st.one_of(
                    st.sampled_from([b"nistp256", b"nistp384", b"nistp521"]),
                    st.binary(max_size=100),
                    st.binary(min_size=1, max_size=1).map(
                        lambda tag: tag + b"\x01" * 64
                    ),
                ),
                max_size=3,
            ).map(lambda strings: b"".join(_sshString(x) for x in strings)),
        ),
    )
    def test_arbitraryBlobs(self, name: str, keyType: bytes, rest: bytes) -> None:
        """
        Whatever the bytes after a key type, C{fromWire} either gives a key
        whose blob is exactly those bytes or raises L{IdentityError}: no other
        exception.
        """
        blob = _sshString(keyType) + rest
        try:
            key = PublicKey.fromWire(name, blob)
        except IdentityError:
            return
        self.assertEqual(key.blob, blob)

    @settings(max_examples=200, deadline=None)
    @given(name=st.text(max_size=30), blob=st.binary(max_size=200))
    def test_arbitraryInput(self, name: str, blob: bytes) -> None:
        try:
            key = PublicKey.fromWire(name, blob)
        except IdentityError:
            return
        self.assertEqual(key.blob, blob)


class FromOpenSSHTests(SynchronousTestCase):
    """
    L{PublicKey.fromOpenSSH} parses public-key lines.
    """

    def test_roundTrip(self) -> None:
        for algorithm in SHORT_NAMES:
            key = makeIdentity(algorithm=algorithm).publicKey
            for line in [key.openssh(), key.openssh("acme/billing")]:
                self.assertEqual(PublicKey.fromOpenSSH(line), key)
                self.assertEqual(PublicKey.fromOpenSSH(line.encode() + b"\n"), key)

    def test_typeMismatch(self) -> None:
        """
        A line whose type word differs from the type inside the blob is
        refused.
        """
        key = makeIdentity().publicKey
        line = key.openssh().replace("ssh-ed25519", "ecdsa-sha2-nistp256")
        self.assertRaises(IdentityError, PublicKey.fromOpenSSH, line)

    def test_malformed(self) -> None:
        key = makeIdentity().publicKey
        encoded = key.openssh().split()[1]
        for line in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 !!!notbase64!!!",
            f"ssh-ed25519 {encoded[:-8]}",
            f"ssh-dss {base64.b64encode(_sshString(b'ssh-dss')).decode()}",
            "ssh-ed25519 AAAA",
        ]:
            self.assertRaises(IdentityError, PublicKey.fromOpenSSH, line)
