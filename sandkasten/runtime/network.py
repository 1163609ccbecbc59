"""Bridge networking: one host bridge, a veth pair per sandbox, egress denied by default.

Shape (all names deterministic, so teardown and the orphan sweep find them again):
  sandbox netns: eth0 <address>/<prefix>, default via <gateway>
        │ veth pair; host end `sk-<12 hex of sha256(sid)>` (≤ 15 chars), ifalias
        │ "sandkasten <sid> <data-dir tag>" so `host_sessions` can map it back
  host: bridge `<bridge>` with <gateway>; ports isolated (no sandbox↔sandbox at L2)
  nft (our own tables only, never anyone else's):
    table inet   sandkasten-<bridge>: forward/input filters keyed by source address
        (`egress` map: sandbox address → jump chain `sb-<sid>` holding its allow-list),
        masquerade for what leaves the bridge; everything else from the bridge is dropped,
        including the host's own addresses (except the configured DNS servers on port 53).
    table bridge sandkasten-<bridge>: a port may only send IPv4/ARP from its own address.

Who runs what: `attach` runs in the single-threaded spawner (host root) between the sandbox's
unshare and its setup finishing (PID 1 waits for it on a pipe); `detach` runs wherever a sandbox
is destroyed (daemon thread, CLI, tests) and is safe to repeat. Forwarding is switched on only
for the bridge itself (`/proc/sys/net/ipv4/conf/<bridge>/forwarding`); reaching beyond the host
also needs the uplink to forward (`enable_ip_forward`, off by default — a host-wide switch).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandkasten.errors import InvalidRequest, SandboxError

VETH_PREFIX = "sk-"
TABLE_PREFIX = "sandkasten-"
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
MAX_EGRESS_ENTRIES = 32
SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class Settings:
    """The host side of bridge mode (config `network:`); names already resolved."""

    bridge: str = "sk0"
    subnet: str = "10.213.0.0/16"
    egress_allow: tuple[str, ...] = ()      # CIDRs every bridge sandbox may reach
    dns: tuple[str, ...] = ()               # resolvers sandboxes may query (port 53)
    enable_ip_forward: bool = False

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def table(self) -> str:
        return TABLE_PREFIX + self.bridge

    def to_json(self) -> dict:
        return {"bridge": self.bridge, "subnet": self.subnet, "egress_allow": list(self.egress_allow),
                "dns": list(self.dns), "enable_ip_forward": self.enable_ip_forward}

    @classmethod
    def from_json(cls, d: dict) -> Settings:
        return cls(bridge=d["bridge"], subnet=d["subnet"], egress_allow=tuple(d["egress_allow"]),
                   dns=tuple(d["dns"]), enable_ip_forward=bool(d["enable_ip_forward"]))


def veth_name(sid: str) -> str:
    return VETH_PREFIX + hashlib.sha256(sid.encode()).hexdigest()[:12]


def chain_name(sid: str) -> str:
    return "sb-" + sid


def data_dir_tag(data_dir: Path) -> str:
    return hashlib.sha256(str(Path(data_dir).absolute()).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- allow-lists (pure + DNS)

def egress_entries(entries: Iterable[str], settings: Settings, within: Iterable[str] = ("0.0.0.0/0",),
                   resolve=socket.getaddrinfo) -> tuple[str, ...]:
    """CIDRs from a client's `egress_allow`: CIDRs/addresses as given, host names resolved
    (IPv4) now. Refused: IPv6, loopback/link-local/multicast/reserved ranges, anything
    overlapping the bridge subnet, and anything outside `within` (config bound)."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple)):
        raise InvalidRequest("invalid egress_allow: expected a list of CIDRs or host names", field="egress_allow")
    if len(entries) > MAX_EGRESS_ENTRIES:
        raise InvalidRequest(f"invalid egress_allow: at most {MAX_EGRESS_ENTRIES} entries",
                             field="egress_allow", maximum=MAX_EGRESS_ENTRIES)
    bounds = [ipaddress.IPv4Network(w) for w in within]
    out: list[str] = []
    for entry in entries:
        for net in _networks(entry, resolve):
            _check_reachable(entry, net, settings)
            if not any(net.subnet_of(b) for b in bounds):
                raise InvalidRequest(f"invalid egress_allow entry {entry!r}: {net} is outside the allowed "
                                     f"range ({', '.join(map(str, bounds)) or 'none'})", field="egress_allow")
            if str(net) not in out:
                out.append(str(net))
    return tuple(out)


def _networks(entry, resolve) -> list[ipaddress.IPv4Network]:
    if not isinstance(entry, str) or not entry:
        raise InvalidRequest(f"invalid egress_allow entry {entry!r}: expected a CIDR or host name",
                             field="egress_allow")
    try:
        net = ipaddress.ip_network(entry, strict=True)
    except ValueError as e:
        if not re.search(r"[A-Za-z]", entry):
            raise InvalidRequest(f"invalid egress_allow entry {entry!r}: {e}", field="egress_allow") from None
        if not HOSTNAME.match(entry):
            raise InvalidRequest(f"invalid egress_allow entry {entry!r}: neither a CIDR nor a host name",
                                 field="egress_allow") from None
        try:
            infos = resolve(entry, None, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise InvalidRequest(f"unable to resolve egress_allow host {entry!r}: {e}", field="egress_allow") from None
        return sorted({ipaddress.IPv4Network(info[4][0]) for info in infos})
    if net.version != 4:
        raise InvalidRequest(f"invalid egress_allow entry {entry!r}: IPv6 egress is not supported",
                             field="egress_allow")
    return [net]


def _check_reachable(entry: str, net: ipaddress.IPv4Network, settings: Settings) -> None:
    bad = next((why for why, hit in (
        ("loopback", net.overlaps(ipaddress.IPv4Network("127.0.0.0/8"))),
        ("link-local", net.overlaps(ipaddress.IPv4Network("169.254.0.0/16"))),
        ("multicast or reserved", net.overlaps(ipaddress.IPv4Network("224.0.0.0/3"))),
        ("'this network'", net.overlaps(ipaddress.IPv4Network("0.0.0.0/8"))),
        ("the sandbox bridge subnet", net.overlaps(settings.network))) if hit), None)
    if bad:
        raise InvalidRequest(f"invalid egress_allow entry {entry!r}: {net} overlaps {bad}", field="egress_allow")


def resolve_settings(bridge: str, subnet: str, egress_allow: Iterable[str], dns: Iterable[str],
                     enable_ip_forward: bool = False) -> Settings:
    """Settings from config values, host names resolved now (daemon start)."""
    base = Settings(bridge=bridge, subnet=subnet, dns=tuple(dns), enable_ip_forward=enable_ip_forward)
    try:
        allow = egress_entries(list(egress_allow), base)
    except InvalidRequest as e:
        raise SandboxError(f"unable to use network.egress_allow: {e.message}") from None
    return Settings(bridge=bridge, subnet=subnet, egress_allow=allow, dns=tuple(dns),
                    enable_ip_forward=enable_ip_forward)


# ---------------------------------------------------------------- host side

def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SandboxError(f"unable to run {args[0]}: not installed (tools/debian-deps installs it)") from None
    except subprocess.TimeoutExpired:
        raise SandboxError(f"unable to run {' '.join(args[:3])}: timed out") from None
    if check and done.returncode != 0:
        raise SandboxError(f"unable to run {' '.join(args[:4])}: {done.stderr.strip() or done.returncode}")
    return done


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/net/{path}", "w") as f:
        f.write(value)


def _table_script(s: Settings) -> str:
    br, sub = json.dumps(s.bridge), s.subnet
    dns = f"elements = {{ {', '.join(s.dns)} }}" if s.dns else ""
    return f"""
table inet {s.table} {{
  map egress {{ type ipv4_addr : verdict; }}
  set dns {{ type ipv4_addr; {dns} }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {br} jump from_sandboxes
    oifname {br} ct state established,related accept
    oifname {br} drop
  }}
  chain from_sandboxes {{
    ip daddr {sub} drop
    ct state established,related accept
    ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept
    ip saddr vmap @egress
    drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {br} ct state established,related accept
    iifname {br} ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname {br} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {sub} oifname != {br} masquerade
  }}
}}
table bridge {s.table} {{
  set ports {{ type ifname; }}
  set bound {{ type ifname . ipv4_addr; }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname @ports ether type ip iifname . ip saddr != @bound drop
    iifname @ports ether type arp iifname . arp saddr ip != @bound drop
    iifname @ports ether type != {{ ip, arp }} drop
  }}
}}
"""


def _used_addresses(s: Settings) -> set[str] | None:
    """Addresses in the egress map (None when our table does not exist yet)."""
    done = _run(["nft", "-j", "list", "map", "inet", s.table, "egress"], check=False)
    if done.returncode != 0:
        return None
    used = set()
    for item in json.loads(done.stdout)["nftables"]:
        for elem in item.get("map", {}).get("elem", []):
            used.add(elem[0])
    return used


def ensure_host(s: Settings) -> set[str]:
    """Bridge with the gateway address, forwarding on it, our nft tables. Idempotent.
    Returns the addresses already handed out."""
    if not (SYS_NET / s.bridge).exists():
        _run(["ip", "link", "add", s.bridge, "type", "bridge"])
    _sysctl(f"ipv6/conf/{s.bridge}/disable_ipv6", "1")
    _run(["ip", "-batch", "-"], f"addr replace {s.gateway}/{s.network.prefixlen} dev {s.bridge}\n"
                                f"link set {s.bridge} up\n")
    _sysctl(f"ipv4/conf/{s.bridge}/forwarding", "1")
    if s.enable_ip_forward:
        _sysctl("ipv4/ip_forward", "1")  # host-wide; never switched back (others may rely on it)
    used = _used_addresses(s)
    if used is None:
        _run(["nft", "-f", "-"], _table_script(s))
        used = set()
    return used


def pick_address(s: Settings, sid: str, used: set[str]) -> str:
    net = s.network
    first, count = int(net.network_address) + 2, net.num_addresses - 3   # skip net, gateway, broadcast
    start = int.from_bytes(hashlib.sha256(sid.encode()).digest()[:8], "big") % count
    for i in range(count):
        addr = str(ipaddress.IPv4Address(first + (start + i) % count))
        if addr not in used:
            return addr
    raise SandboxError(f"unable to connect sandbox {sid}: no free address left in {s.subnet}")


def attach(s: Settings, sid: str, pid: int, allow: Iterable[str], marker: Path, data_dir: Path) -> dict:
    """Connect the sandbox whose PID 1 is `pid` to the bridge. Runs in the spawner (host root).
    The marker (written first) lets `detach` find everything again without the config."""
    veth, chain = veth_name(sid), chain_name(sid)
    Path(marker).write_text(json.dumps({"table": s.table, "bridge": s.bridge, "veth": veth}))
    used = ensure_host(s)
    addr = pick_address(s, sid, used)
    allow = sorted(set(s.egress_allow) | set(allow))
    rules = [f"add chain inet {s.table} {chain}"]
    if allow:
        rules.append(f"add rule inet {s.table} {chain} ip daddr {{ {', '.join(allow)} }} accept")
    rules += [f"add element inet {s.table} egress {{ {addr} : jump {chain} }}",
              f"add element bridge {s.table} ports {{ \"{veth}\" }}",
              f"add element bridge {s.table} bound {{ \"{veth}\" . {addr} }}"]
    _run(["nft", "-f", "-"], "\n".join(rules) + "\n")
    alias = f"sandkasten {sid} {data_dir_tag(data_dir)}"
    _run(["ip", "-batch", "-"], f"link add {veth} type veth peer name eth0 netns {pid}\n"
                                f"link set {veth} alias \"{alias}\"\n"
                                f"link set {veth} master {s.bridge}\n"
                                f"link set dev {veth} type bridge_slave isolated on\n"
                                f"link set {veth} up\n")
    _run(["nsenter", "-t", str(pid), "-n", "ip", "-batch", "-"],
         f"addr add {addr}/{s.network.prefixlen} dev eth0\nlink set eth0 up\n"
         f"route add default via {s.gateway} dev eth0\n")
    return {"veth": veth, "address": addr, "gateway": s.gateway, "prefixlen": s.network.prefixlen,
            "dns": list(s.dns), "allow": allow}


def detach(sid: str, marker: Path, s: Settings) -> None:
    """Remove the sandbox's veth and nft entries by their deterministic names. Idempotent;
    the marker (if the spawner wrote one) names the table, else the given settings do."""
    veth, chain = veth_name(sid), chain_name(sid)
    marker = Path(marker)
    if not marker.exists() and not (SYS_NET / veth).exists():
        return  # never attached (mode none), or already detached: nothing of ours can exist
    try:
        table = json.loads(marker.read_text())["table"]
    except (OSError, ValueError, KeyError):
        table = s.table
    if (SYS_NET / veth).exists():
        done = _run(["ip", "link", "del", veth], check=False)
        if done.returncode != 0 and (SYS_NET / veth).exists():
            raise SandboxError(f"unable to remove veth {veth} of sandbox {sid}: {done.stderr.strip()}")
    _remove_rules(table, sid, veth, chain)


def _has_chain(table: str, chain: str) -> bool:
    return _run(["nft", "list", "chain", "inet", table, chain], check=False).returncode == 0


def _remove_rules(table: str, sid: str, veth: str, chain: str) -> None:
    script = []
    done = _run(["nft", "-j", "list", "map", "inet", table, "egress"], check=False)
    if done.returncode == 0:
        for item in json.loads(done.stdout)["nftables"]:
            for key, verdict in item.get("map", {}).get("elem", []):
                if verdict.get("jump", {}).get("target") == chain:
                    script.append(f"delete element inet {table} egress {{ {key} }}")
    done = _run(["nft", "-j", "list", "set", "bridge", table, "bound"], check=False)
    if done.returncode == 0:
        for item in json.loads(done.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                name, addr = elem["concat"]
                if name == veth:
                    script.append(f"delete element bridge {table} bound {{ \"{veth}\" . {addr} }}")
    done = _run(["nft", "-j", "list", "set", "bridge", table, "ports"], check=False)
    if done.returncode == 0 and any(veth in item.get("set", {}).get("elem", [])
                                    for item in json.loads(done.stdout)["nftables"]):
        script.append(f"delete element bridge {table} ports {{ \"{veth}\" }}")
    if _has_chain(table, chain):
        script.append(f"delete chain inet {table} {chain}")
    if script:
        _run(["nft", "-f", "-"], "\n".join(script) + "\n")


def leftover_sessions(data_dir: Path) -> set[str]:
    """Session ids of veths this data dir's sandboxes own (found by their ifalias)."""
    tag = data_dir_tag(data_dir)
    found: set[str] = set()
    try:
        names = [n for n in os.listdir(SYS_NET) if n.startswith(VETH_PREFIX)]
    except OSError:
        return found
    for name in names:
        try:
            parts = (SYS_NET / name / "ifalias").read_text().split()
        except OSError:
            continue
        if len(parts) == 3 and parts[0] == "sandkasten" and parts[2] == tag:
            found.add(parts[1])
    return found


def has_veth(sid: str) -> bool:
    return (SYS_NET / veth_name(sid)).exists()


def remove_host(s: Settings) -> None:
    """Remove our tables and the bridge (tests, or an operator resetting the network)."""
    for family in ("inet", "bridge"):
        if _run(["nft", "list", "table", family, s.table], check=False).returncode == 0:
            _run(["nft", "delete", "table", family, s.table])
    if (SYS_NET / s.bridge).exists():
        _run(["ip", "link", "del", s.bridge])


def release_host(s: Settings) -> bool:
    """Remove the bridge and our tables if no sandbox is attached to the bridge any more (a
    daemon stopping): True if nothing is left. Sandboxes outlive a daemon, so a bridge with ports
    stays for them (and for the next daemon)."""
    if not (SYS_NET / s.bridge).exists():
        return True  # never made (no bridged session), or gone already
    ports = SYS_NET / s.bridge / "brif"
    if ports.is_dir() and any(ports.iterdir()):
        return False
    remove_host(s)
    return True


def from_config(n) -> Settings:
    """Settings from the config's `network:` section (names resolved now, at start)."""
    return resolve_settings(n.bridge, n.subnet, n.egress_allow, n.dns, n.enable_ip_forward)
