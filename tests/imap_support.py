"""A real Dovecot for the imap/gmail tests: started unprivileged on two free
loopback ports (IMAP with STARTTLS, and IMAPS) with its config, passwd-file
user and maildirs in a temporary folder, and a test CA and server
certificate made at start with the ``openssl`` command.  ``stop()`` ends
the master and its whole process group, leaving no process.  (Not a test
module.)  Without dovecot or openssl the tests skip with a visible reason,
unless NEXO_REQUIRE_IMAP=1 (CI), where they fail."""

import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import unittest

from nats_support import free_port
from support import wait_until

DOVECOT = shutil.which("dovecot") or (
    "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)
OPENSSL = shutil.which("openssl")
USER, PASSWORD = "tester", "s3cret pass"


def require_imap() -> None:
    """Call from setUpClass/setUp: skip (or fail under NEXO_REQUIRE_IMAP=1)."""
    missing = [name for name, path in (("dovecot", DOVECOT), ("openssl", OPENSSL))
               if path is None]
    if missing:
        if os.environ.get("NEXO_REQUIRE_IMAP") == "1":
            raise AssertionError(f"{' and '.join(missing)} not found and NEXO_REQUIRE_IMAP=1")
        raise unittest.SkipTest(f"{' and '.join(missing)} not installed "
                                "(apt-get install dovecot-imapd openssl)")


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def make_certs(folder: str) -> str:
    """A test CA (ca.pem) and a server certificate it signs for 127.0.0.1
    and localhost (server.pem, server.key) in ``folder``; the CA's path."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    # The extensions Python 3.13's strict verification (VERIFY_X509_STRICT) wants.
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=nexo-poller test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=folder)
    with open(os.path.join(folder, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=folder)
    return os.path.join(folder, "ca.pem")


def _live_in_group(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still alive (not zombies), from /proc."""
    live = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue                                # gone meanwhile
        if int(group) == pgid and state not in "ZX":
            live.append(int(name))
    return live


class Dovecot:
    """One Dovecot; ``start()`` returns once it greets on both ports.  As
    root it runs as ``nobody`` (Dovecot refuses to serve as root)."""

    def __init__(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="nexo-dovecot-"))
        self.port, self.tls_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.ca_file = make_certs(self.dir)

    def _config(self, user: str, group: str, uid: int, gid: int) -> str:
        d = self.dir
        with open(os.path.join(d, "passwd"), "w") as f:
            f.write(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        path = os.path.join(d, "dovecot.conf")
        with open(path, "w") as f:
            f.write(f"""\
protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/run
instance_name = nexo-test-{os.path.basename(d)}
log_path = {d}/dovecot.log
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{d}/mail/%u
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_failure_delay = 0
ssl = yes
ssl_cert = <{d}/server.pem
ssl_key = <{d}/server.key
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
""")
        return path

    def start(self) -> "Dovecot":
        os.makedirs(os.path.join(self.dir, "run"))
        os.makedirs(os.path.join(self.dir, "mail"))
        options = {}
        if os.geteuid() == 0:
            who = pwd.getpwnam("nobody")
            options = {"user": who.pw_uid, "group": who.pw_gid, "extra_groups": []}
            for root, dirs, files in os.walk(self.dir):
                for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                    os.chown(name, who.pw_uid, who.pw_gid)
        else:
            who = pwd.getpwuid(os.geteuid())
        conf = self._config(who.pw_name, grp.getgrgid(who.pw_gid).gr_name, who.pw_uid,
                            who.pw_gid)
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, **options)

        def greets(port: int) -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), 1) as s:
                    if port == self.tls_port:
                        return True
                    return s.recv(4096).startswith(b"* OK")
            except OSError:
                return self.proc.poll() is not None

        if not (wait_until(lambda: greets(self.port), 20, 0.02)
                and wait_until(lambda: greets(self.tls_port), 20, 0.02)) \
                or self.proc.poll() is not None:
            log = self.log()
            self.stop()
            raise AssertionError(f"dovecot did not start: {log[-2000:]}")
        return self

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "dovecot.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the master and its whole process group at once (on SIGTERM
        Dovecot takes seconds to wind down), reap the master, and wait
        until no process of the group is left alive (the others' zombies
        are init's to reap)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        if not wait_until(lambda: not _live_in_group(pgid), 10, 0.01):
            raise AssertionError(f"dovecot processes {_live_in_group(pgid)} outlived stop()")
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------- a client

    def client(self, mailbox: str = "INBOX") -> imaplib.IMAP4_SSL:
        """A logged-in client over IMAPS with ``mailbox`` selected; closed
        by the caller (``with`` works)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        conn = imaplib.IMAP4_SSL("127.0.0.1", self.tls_port, ssl_context=ctx, timeout=15)
        conn.login(USER, PASSWORD)
        typ, data = conn.select(mailbox)
        if typ != "OK":
            conn.create(mailbox)
            conn.select(mailbox)
        return conn

    def append(self, subject: str, body: str = "hello", *, sender: str = "alice@example.com",
               mailbox: str = "INBOX", date: str = "Sat, 05 Dec 2026 10:00:00 +0000",
               internaldate=None) -> int:
        """Append one mail through IMAP; its UID."""
        raw = (f"From: {sender}\r\nTo: {USER}@example.com\r\nSubject: {subject}\r\n"
               f"Date: {date}\r\nMessage-ID: <{subject.replace(' ', '.')}@test>\r\n"
               f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()
        with self.client(mailbox) as conn:
            when = imaplib.Time2Internaldate(internaldate) if internaldate else None
            typ, data = conn.append(mailbox, None, when, raw)
            assert typ == "OK", data
            return int(data[0].split(b"]")[0].split()[-1])

    def seen(self, uid: int, mailbox: str = "INBOX") -> bool:
        with self.client(mailbox) as conn:
            typ, data = conn.uid("FETCH", str(uid), "(FLAGS)")
            return b"\\Seen" in data[0]

    def recreate(self, mailbox: str) -> None:
        """Delete ``mailbox`` and make it again: a new UIDVALIDITY."""
        with self.client() as conn:
            conn.delete(mailbox)
            conn.create(mailbox)

    def uidvalidity(self, mailbox: str) -> int:
        with self.client() as conn:
            typ, data = conn.status(mailbox, "(UIDVALIDITY)")
            return int(data[0].rsplit(b" ", 1)[1].rstrip(b")"))
