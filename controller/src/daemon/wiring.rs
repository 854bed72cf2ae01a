//! What `p2pcdn run` builds from `[dataplane]` and `[surrogate]` before starting the node: the
//! redirector's pinned maps (with the configured services installed), the surrogate, and the
//! steering settings.

use std::sync::{Arc, Mutex};

use redirector_user::{Dataplane, Redirector, ServiceSpec};

use super::{DaemonError, Options};
use crate::{
    config::Config,
    steering::{SharedDataplane, SteeringSettings},
    surrogate::{Surrogate, SurrogateConfig},
};

/// The options `config` asks for (the defaults plus the data plane and the surrogate).
pub(crate) async fn options(config: &Config) -> Result<Options, DaemonError> {
    let mut options = Options::default();
    if let Some(d) = &config.dataplane {
        let redirector = Redirector::open(&d.iface, &d.pin_root)
            .map_err(|e| DaemonError::Dataplane(format!("{}: {e}", d.iface)))?;
        let mut dataplane: Box<dyn Dataplane + Send> = Box::new(redirector);
        if d.install_services {
            for s in &config.services {
                let rate = s
                    .capacity_conn_per_s
                    .unwrap_or(config.resources.new_connections_per_s);
                let spec = ServiceSpec::new(s.name.clone(), s.addresses.clone(), rate);
                dataplane
                    .upsert_service(&spec)
                    .map_err(|e| DaemonError::Dataplane(format!("service {}: {e}", s.name)))?;
                tracing::info!(service = %s.name, rate, "service installed in the data plane");
            }
        }
        let shared: SharedDataplane = Arc::new(Mutex::new(dataplane));
        options.dataplane = Some(shared);
        options.steering = SteeringSettings {
            mtu: d.mtu,
            manage_loopback: d.manage_loopback,
            ..SteeringSettings::default()
        };
    }
    if let Some(s) = &config.surrogate {
        let dir = s
            .dir
            .clone()
            .unwrap_or_else(|| config.node.data_dir.join("surrogate"));
        let mut cfg = SurrogateConfig::new(dir);
        cfg.memory_bytes = s.memory_bytes;
        cfg.disk_bytes = s.disk_bytes;
        let surrogate = Surrogate::new(cfg)
            .await
            .map_err(|e| DaemonError::Surrogate(e.to_string()))?;
        options.surrogate = Some(surrogate);
        options.steering.max_object_bytes = s.max_object_bytes;
        options.steering.storage_bytes = s.arrangement_bytes;
        options.steering.allow_origin = s.allow_origin.clone();
    }
    Ok(options)
}
