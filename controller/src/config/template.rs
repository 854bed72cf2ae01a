//! The commented config file `p2pcdn init` writes. Every key of every section is here, with
//! its meaning and default; optional keys without a default are commented out.

pub(super) struct Values<'a> {
    pub name: &'a str,
    pub organisation: &'a str,
    pub fingerprint: &'a str,
    pub operator_token: &'a str,
    pub viewer_token: &'a str,
}

/// A TOML basic string with the needed escapes.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

pub(super) fn render(v: &Values<'_>) -> String {
    TEMPLATE
        .replace("@NAME@", &quoted(v.name))
        .replace("@ORGANISATION@", &quoted(v.organisation))
        .replace("@FINGERPRINT@", v.fingerprint)
        .replace("@OPERATOR_TOKEN@", &quoted(v.operator_token))
        .replace("@VIEWER_TOKEN@", &quoted(v.viewer_token))
}

const TEMPLATE: &str = r#"# p2pcdn node configuration, written by `p2pcdn init`.
# This node's identity (SHA-256 of its public key): @FINGERPRINT@
# Every key is described below with its default; docs/operations.md is the full reference.
# Relative paths resolve against the directory of this file. `p2pcdn run` checks every value
# before it binds anything and exits with status 64 and a one-line reason on a bad one.
# This file holds the admin tokens: keep it readable by root only (mode 0600).

[node]
# Human name of the node in peers' tables: 1 to 64 characters of A-Z a-z 0-9 . _ - (required).
name = @NAME@
# Operating organisation (peers may allow by organisation), at most 128 characters.
# Default: empty.
organisation = @ORGANISATION@
# Directory of the store (p2pcdn.db: peers, arrangements, usage ledger).
# Default: "." (this file's directory).
data_dir = "."
# gRPC (mutual TLS) listen address for peers. Default: "0.0.0.0:7443".
# init listens on loopback only; for a real deployment set "0.0.0.0:7443" (or the public
# address) and set advertise_control.
listen = "127.0.0.1:7443"
# host:port peers dial to reach `listen` (an IP address or a DNS name).
# Default: `listen`; required when `listen` is an unspecified address such as 0.0.0.0.
# advertise_control = "edge-a.example.net:7443"
# Footprint, RFC 8008 style: ISO 3166 region codes ("DE", "US-CA") of the clients this
# node serves well. Default: [].
regions = []
# Footprint: client prefixes (CIDR, IPv4 or IPv6) this node serves well. Default: [].
# Example: ["198.51.100.0/24", "2001:db8::/32"]
client_prefixes = []

[tls]
# PEM PKCS#8 private key of the node (mode 0600). Default: "node.key".
key = "node.key"
# PEM self-signed certificate of the node. Default: "node.crt".
cert = "node.crt"
# PEM CA certificates: peers whose certificate chains to one of them are allowed.
# Default: none (peers are pinned by fingerprint only).
# ca_bundle = "ca.pem"

[discovery]
# UDP listen address of membership gossip. Default: "0.0.0.0:7946".
gossip_listen = "127.0.0.1:7946"
# ip:port other nodes gossip to. Default: `gossip_listen`; required when that is unspecified.
# advertise_gossip = "203.0.113.10:7946"
# Gossip endpoints (host:port) of nodes to join through. Default: [] (a first node).
seeds = []
# Gossip round interval, 10 to 60000 ms. Default: 500.
gossip_interval_ms = 500
# Lifetime of this node's signed advertisement, 2 to 86400 s. Default: 60.
advert_ttl_s = 60
# Interval between fresh advertisements (new sequence, spare capacity measured again),
# at least 1 s and less than advert_ttl_s. Default: 10.
advert_refresh_s = 10
# A node silent for this long is suspect, in ms. Default: 3000.
suspect_after_ms = 3000
# ... and dead (its advertisement removed) after this long, more than suspect_after_ms.
# Default: 15000.
dead_after_ms = 15000

[admin]
# HTTPS listen address of the operator API (served with the node certificate).
# Default: "127.0.0.1:7444".
listen = "127.0.0.1:7444"

# Bearer tokens of the admin API, each with a role: "viewer" (read only, /metrics) or
# "operator" (also policy changes, negotiate, disband). 16 to 512 printable characters.
# Default: none. These two were generated at random by init.
[[admin.tokens]]
# The secret the client sends as "Authorization: Bearer <token>".
token = @OPERATOR_TOKEN@
# Its role: "viewer" or "operator".
role = "operator"

[[admin.tokens]]
# The secret the client sends as "Authorization: Bearer <token>".
token = @VIEWER_TOKEN@
# Its role: "viewer" or "operator".
role = "viewer"

# Client certificates admitted to the admin API, by fingerprint (64 hex digits), with a role.
# Default: none.
# [[admin.clients]]
# fingerprint = "<64 hex digits>"             # SHA-256 of the client certificate's public key
# role = "operator"                            # "viewer" or "operator"

[resources]
# New TCP connections per second this node can take. Default: 1000.
new_connections_per_s = 1000
# Egress bandwidth in Mbit/s. Default: 1000.
egress_mbps = 1000
# Storage for replicated content, bytes. Default: 0.
storage_bytes = 0
# IPv4 address that accepts tunnelled (DSR) traffic from peers. Default: none.
# decap_v4 = "203.0.113.10"
# IPv6 address that accepts tunnelled (DSR) traffic from peers. Default: none.
# decap_v6 = "2001:db8::10"
# Base URL of this node's surrogate HTTP server, http(s)://host[:port]. Default: none.
# surrogate_url = "https://edge-a.example.net"
# Redirection modes peers' traffic may reach this node through: "dsr-gue", "dsr-ipip"
# (need decap_v4 or decap_v6), "http-redirect" (needs surrogate_url).
# Default: every mode the addresses above allow.
# modes = ["dsr-gue", "dsr-ipip", "http-redirect"]

[policy]
# Peers not listed in allow, the CA bundle or a long-term agreement: "allow-list" refuses
# them, "first-contact" admits them at the lowest trust and pins them. Default: "allow-list".
admit_unknown = "allow-list"
# Peers allowed, each { fingerprint = "<64 hex>" } or { organisation = "Name" }. Default: [].
allow = []
# Peers refused whatever else says, same form as allow. Default: [].
deny = []
# Peers whose reputation score is lower get no offer, 0 to 1000000 ppm. Default: 0.
min_reputation_ppm = 0
# Provider side: share of own capacity that may be offered to peers, 0 to 100 %. Default: 50.
offer_share_percent = 50
# Provider side: list price per GB delivered, micro-units of currency. Default: 20000.
price_per_gb_micros = 20000
# Provider side: list price per 1000 new connections, micro-units. Default: 1000.
price_per_1000_connections_micros = 1000
# ISO 4217 currency of every price. Default: "EUR".
currency = "EUR"
# Provider side: a counter-offer is accepted down to this share of the list price,
# 1 to 100 %. Default: 80.
min_price_percent = 80
# Provider side: availability promised, ppm (999000 = 99.9 %). Default: 999000.
sla_availability_ppm = 999000
# Provider side: p99 time to first byte promised, ms. Default: 200.
sla_p99_latency_ms = 200
# Provider side: credit per SLA breach, % of the charges. Default: 10.
penalty_credit_percent = 10
# Provider side: upper bound of the total credit, % of the charges (at least
# penalty_credit_percent, at most 100). Default: 30.
penalty_max_percent = 30
# Provider side: how long an offer stays valid, 100 to 600000 ms. Default: 10000.
offer_ttl_ms = 10000
# Primary side: the most this node pays per GB, micro-units. Default: 50000.
max_price_per_gb_micros = 50000
# Primary side: the most this node pays per 1000 connections, micro-units. Default: 5000.
max_price_per_1000_connections_micros = 5000
# Primary side: the least availability accepted, ppm. Default: 990000.
min_sla_availability_ppm = 990000
# Primary side: the largest p99 latency accepted, ms. Default: 500.
max_sla_p99_latency_ms = 500
# Primary side: how many candidates are asked for offers at once, 1 to 32. Default: 3.
candidates = 3
# Primary side: how long to wait for each candidate's answer, 50 to 60000 ms. Default: 3000.
negotiation_timeout_ms = 3000

# Long-term agreements: terms agreed in advance with one peer, activated in 2 steps without
# a negotiation. Both sides list the same agreement_id. Default: none.
# [[policy.long_term]]
# agreement_id = "acme-2025"                  # 1 to 64 characters of A-Z a-z 0-9 . _ -
# peer = "<64 hex digits>"                     # the other side's fingerprint
# role = "primary"                             # our side: "primary" (we steer) or "provider"
# new_connections_per_s = 500                  # capacity agreed (at least 1)
# egress_mbps = 1000                           # default 0 (connections only)
# price_per_gb_micros = 15000                  # default 0
# price_per_1000_connections_micros = 500      # default 0
# currency = "EUR"                             # default: policy.currency
# sla_availability_ppm = 999000                # default: policy.sla_availability_ppm
# sla_p99_latency_ms = 200                     # default: policy.sla_p99_latency_ms
# duration_s = 3600                            # each activation, 1 to 604800 s; default 3600
# standby = false                              # primary: keep it active so XDP steers at once

# Services whose overflow this node may steer to peers. Default: none.
# [[services]]
# name = "video"                               # 1 to 32 characters of a-z 0-9 -
# addresses = ["192.0.2.10:443", "[2001:db8::10]:443"]   # ip:port, at least one
# host_names = ["video.example.net"]           # HTTP host names; default []
# manifest_url = "https://origin.example.net/video/manifest"   # default none
# duration_s = 3600                            # arrangements requested for, 1 to 604800 s
# capacity_conn_per_s = 1000                   # local admission; default resources.new_connections_per_s
# origin_status_url = "http://127.0.0.1:8080/nginx_status"  # read by [admission]; default none

# The XDP redirector this node programs (attach it first: p2pcdn-redirector -i IFACE attach).
# Without this section the node negotiates but steers nothing and allows no tunnels.
# [dataplane]
# iface = "eth0"                               # the interface the redirector is attached to
# pin_root = "/sys/fs/bpf/p2pcdn"              # where its maps are pinned
# install_services = true                      # write [[services]] into the data plane at start
# mtu = 1500                                   # path MTU to providers (MSS clamping), 576 to 65535
# manage_loopback = true                       # provider: primaries' service addresses on lo

# The overload detector of each service (needs [dataplane]): the rate of new connections
# arriving, against the service's capacity, with hysteresis (docs/flash-crowd.md).
[monitor]
# Counters are read this often, 10 to 10000 ms. Default: 100.
interval_ms = 100
# Rates are measured over this window (at least interval_ms, at most 60000 ms). Default: 1000.
window_ms = 1000
# Overloaded at or above this share of the capacity, percent. Default: 90.
high_water_percent = 90
# The crowd is over below this share (below high_water_percent), percent. Default: 60.
low_water_percent = 60
# The rate must stay high this long before peers are asked, ms. Default: 500.
enter_ms = 500
# The rate must stay low this long before arrangements are retired, ms. Default: 10000.
exit_ms = 10000
# Capacity asked for on top of the excess, percent. Default: 20.
headroom_percent = 20

# Tuning of each service's local admission rate to what the origin sustains (AIMD on the
# origin's answer time and the host's pressure, docs/flash-crowd.md). Without this section the
# rates stay as configured.
# [admission]
# interval_ms = 1000                           # signals read this often, 50 to 60000
# latency_target_ms = 200                      # origin_status_url slower than this: congested
# psi_high_percent = 80                        # /proc/pressure some avg10 above: congested; 0 off
# min_percent = 20                             # never below this share of the capacity
# increase_percent = 5                         # per healthy interval, of the capacity
# decrease_percent = 30                        # on congestion, of the current rate

# The surrogate that serves primaries' content under this node's provider arrangements.
# [surrogate]
# listen = "0.0.0.0:8080"                      # also for redirected clients; default none
# dir = "/var/lib/p2pcdn/surrogate"            # disk tier; default <data_dir>/surrogate
# memory_bytes = 268435456                     # memory tier, all arrangements; default 256 MiB
# disk_bytes = 10737418240                     # disk tier, all arrangements; default 10 GiB
# max_object_bytes = 1073741824                # largest object per arrangement; default 1 GiB
# arrangement_bytes = 1073741824               # stored per arrangement; default 1 GiB
# allow_origin = "https://shop.example.net"    # Access-Control-Allow-Origin; default none
"#;
