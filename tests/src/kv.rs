//! The KV server in the test's own process, on its own runtime, and the
//! blocking reads and writes the real-kernel tests make of one host's
//! records.

use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig, ServerHandle};
use volume_control::layout::{HostRecord, Layout, VolumeSpec, VolumeStatus};
use volume_core::names::{HostId, VolumeId};

pub struct Kv {
    pub runtime: tokio::runtime::Runtime,
    server: Option<ServerHandle>,
    pub client: ConsulKv,
    host: HostId,
}

impl Kv {
    /// A server on loopback; `host` is whose records the helpers read.
    pub fn start(host: &HostId) -> Kv {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime
            .block_on(Server::start(ServerConfig::loopback()))
            .expect("start the KV server");
        let client = ConsulKv::new(
            ClientConfig::new(&server.local_addr().to_string()).expect("client config"),
        )
        .expect("client");
        Kv {
            runtime,
            server: Some(server),
            client,
            host: host.clone(),
        }
    }

    pub fn addr(&self) -> String {
        self.server
            .as_ref()
            .expect("running")
            .local_addr()
            .to_string()
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.runtime
            .block_on(self.client.get(key))
            .expect("KV read")
            .value
            .map(|pair| pair.value)
    }

    pub fn put(&self, key: &str, value: &[u8]) {
        assert!(self
            .runtime
            .block_on(self.client.put(key, value))
            .expect("KV write"));
    }

    pub fn status(&self, id: &VolumeId) -> Option<VolumeStatus> {
        let value = self.get(&Layout::default().status(&self.host, id))?;
        Some(serde_json::from_slice(&value).expect("status JSON"))
    }

    pub fn host_record(&self) -> Option<HostRecord> {
        let value = self.get(&Layout::default().host_info(&self.host))?;
        Some(serde_json::from_slice(&value).expect("host record JSON"))
    }

    pub fn put_spec(&self, spec: &VolumeSpec) {
        self.put(
            &Layout::default().desired(&spec.host, &spec.id),
            &serde_json::to_vec(spec).expect("spec JSON"),
        );
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.shutdown());
        }
    }
}
