//! Steps 2 to 4 of the seed's process: when the web server (the edge's data plane) is
//! overloaded, the mediator collects the local resource information (service registry: the
//! `[[services]]` and `[resources]` configuration) and the policies (policy repository: price
//! ceilings and the least acceptable SLA) and generates the service requirements that the
//! peering agent takes to its peers (step 5) and the negotiation turns into arrangements
//! (step 6).

use crate::{
    config::{ResourcesConfig, ServiceConfig},
    model::UnixMs,
    policy::{Policy, new_id},
    proto::{self, pb},
};

/// How the edge's data plane can steer overflow, in order of preference: the XDP redirector
/// tunnels with GUE or IPIP and the provider answers clients directly (DSR). HTTP redirects
/// need the web server's cooperation and are not asked for by the mediator.
pub const STEERING_MODES: [pb::RedirectionMode; 2] =
    [pb::RedirectionMode::DsrGue, pb::RedirectionMode::DsrIpip];

/// The service requirements for `overflow_conn_per_s` new connections/s of `service` that this
/// node cannot take itself.
///
/// - capacity: the overflow, and the egress it brings at this node's own ratio of egress to
///   connections (`[resources]`), rounded up; storage 0 (the content's size is the manifest's
///   business);
/// - duration: the service's `duration_s`, at most 7 days;
/// - price and SLA: the policy's ceilings (`max_price_*`) and floor (`min_sla_*`);
/// - modes: [`STEERING_MODES`];
/// - request id: `<service>-<now>-<random>`, unique per negotiation.
pub fn requirements(
    service: &ServiceConfig,
    resources: &ResourcesConfig,
    policy: &Policy,
    overflow_conn_per_s: u32,
    now: UnixMs,
) -> pb::ServiceRequirements {
    let egress_mbps = if resources.new_connections_per_s == 0 {
        0
    } else {
        let egress = u64::from(resources.egress_mbps)
            .saturating_mul(u64::from(overflow_conn_per_s))
            .div_ceil(u64::from(resources.new_connections_per_s));
        u32::try_from(egress).unwrap_or(u32::MAX)
    };
    // 8 random hex digits are enough on top of the millisecond: ids need to be unique per
    // node, and the store refuses a duplicate rather than mixing two negotiations.
    let random = new_id("");
    let suffix = random.get(1..9).unwrap_or("0");
    pb::ServiceRequirements {
        request_id: format!("{}-{now}-{suffix}", service.name),
        service: Some(service.to_pb()),
        manifest: service.manifest_url.as_ref().map(|url| pb::ManifestRef {
            url: url.clone(),
            version: 0,
            sha256: Vec::new(),
        }),
        capacity: Some(pb::Capacity {
            new_connections_per_s: overflow_conn_per_s,
            egress_mbps,
            storage_bytes: 0,
        }),
        duration_s: service.duration_s.clamp(1, proto::MAX_DURATION_S),
        max_price: Some(policy.max_price()),
        min_sla: Some(policy.min_sla()),
        modes: STEERING_MODES.iter().map(|m| *m as i32).collect(),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;
    use crate::{
        model::Fingerprint,
        policy::{Policy, PolicySettings},
    };

    fn service(duration_s: u64) -> ServiceConfig {
        toml::from_str(&format!(
            r#"
name = "shop"
addresses = ["198.51.100.10:443", "[2001:db8::10]:443"]
host_names = ["shop.example.org"]
manifest_url = "https://shop.example.org/manifest"
duration_s = {duration_s}
"#
        ))
        .unwrap()
    }

    fn policy() -> Policy {
        let settings = PolicySettings {
            max_price_per_gb_micros: 30_000,
            max_price_per_1000_connections_micros: 3_000,
            min_sla_availability_ppm: 995_000,
            max_sla_p99_latency_ms: 250,
            ..PolicySettings::default()
        };
        Policy::new(Fingerprint([1; 32]), settings, vec![], None).unwrap()
    }

    #[test]
    fn requirements_carry_the_overflow_the_service_and_the_policy_limits() {
        let resources = ResourcesConfig {
            new_connections_per_s: 1000,
            egress_mbps: 2000,
            ..ResourcesConfig::default()
        };
        let req = requirements(&service(600), &resources, &policy(), 250, 1_700_000_000_000);
        proto::validate_requirements(&req).unwrap();
        let capacity = req.capacity.unwrap();
        assert_eq!(capacity.new_connections_per_s, 250);
        assert_eq!(capacity.egress_mbps, 500, "2 Mbit/s per connection/s");
        assert_eq!(req.duration_s, 600);
        let spec = req.service.unwrap();
        assert_eq!(spec.name, "shop");
        assert_eq!(spec.addresses, ["198.51.100.10:443", "[2001:db8::10]:443"]);
        assert_eq!(spec.host_names, ["shop.example.org"]);
        assert_eq!(
            req.manifest.unwrap().url,
            "https://shop.example.org/manifest"
        );
        let max = req.max_price.unwrap();
        assert_eq!(
            (max.per_gb_micros, max.per_1000_connections_micros),
            (30_000, 3_000)
        );
        let sla = req.min_sla.unwrap();
        assert_eq!((sla.availability_ppm, sla.p99_latency_ms), (995_000, 250));
        assert_eq!(
            req.modes,
            [
                pb::RedirectionMode::DsrGue as i32,
                pb::RedirectionMode::DsrIpip as i32
            ]
        );
        assert!(req.request_id.starts_with("shop-1700000000000-"));
        assert!(req.request_id.chars().count() <= proto::MAX_ID_CHARS);
    }

    #[test]
    fn egress_rounds_up_and_request_ids_differ() {
        let resources = ResourcesConfig {
            new_connections_per_s: 3,
            egress_mbps: 1,
            ..ResourcesConfig::default()
        };
        let a = requirements(&service(60), &resources, &policy(), 1, 5);
        let b = requirements(&service(60), &resources, &policy(), 1, 5);
        assert_eq!(a.capacity.unwrap().egress_mbps, 1, "1/3 Mbit/s rounds up");
        assert_ne!(a.request_id, b.request_id);
        let none = ResourcesConfig {
            new_connections_per_s: 0,
            ..ResourcesConfig::default()
        };
        let c = requirements(&service(60), &none, &policy(), 10, 5);
        assert_eq!(c.capacity.unwrap().egress_mbps, 0);
    }
}
