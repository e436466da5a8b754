//! Client configuration from Consul's own environment variables.

use std::path::PathBuf;
use std::time::Duration;

use super::Error;
use crate::secret::SecretToken;

/// Where and how to reach Consul.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    base_url: String,
    /// Sent as `X-Consul-Token`.
    pub token: Option<SecretToken>,
    /// PEM file of CA certificates to trust (added to the system roots).
    pub ca_cert: Option<PathBuf>,
    /// Timeout of non-blocking requests; blocking ones add their wait.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

/// Go's `strconv.ParseBool`, which Consul uses for `CONSUL_HTTP_SSL`.
fn parse_go_bool(name: &str, text: &str) -> Result<bool, Error> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(Error::Config(format!("{name} is not a boolean: {text:?}"))),
    }
}

impl ClientConfig {
    /// `address` is `host:port` (http) or a URL with scheme `http`/`https`.
    pub fn new(address: &str) -> Result<Self, Error> {
        Self::build(address, false)
    }

    fn build(address: &str, force_https: bool) -> Result<Self, Error> {
        let address = address.trim().trim_end_matches('/');
        let (scheme, host_port) = match address.split_once("://") {
            Some(("http", rest)) => ("http", rest),
            Some(("https", rest)) => ("https", rest),
            Some((other, _)) => {
                return Err(Error::Config(format!(
                    "unsupported scheme {other:?} in Consul address (use http or https)"
                )))
            }
            None if force_https => ("https", address),
            None => ("http", address),
        };
        if host_port.is_empty() || host_port.contains('/') || host_port.contains('@') {
            return Err(Error::Config(format!(
                "Consul address must be host:port, got {host_port:?}"
            )));
        }
        Ok(ClientConfig {
            base_url: format!("{scheme}://{host_port}"),
            token: None,
            ca_cert: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        })
    }

    /// Reads `CONSUL_HTTP_ADDR` (default `127.0.0.1:8500`), `CONSUL_HTTP_SSL`,
    /// `CONSUL_HTTP_TOKEN` (else `CONSUL_HTTP_TOKEN_FILE`) and
    /// `CONSUL_CACERT`.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any variable source (tests, config files).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let set = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let force_https = match set("CONSUL_HTTP_SSL") {
            Some(text) => parse_go_bool("CONSUL_HTTP_SSL", &text)?,
            None => false,
        };
        let address = set("CONSUL_HTTP_ADDR").unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
        let mut config = Self::build(&address, force_https)?;
        config.token = match set("CONSUL_HTTP_TOKEN") {
            Some(token) => Some(SecretToken::new(token)),
            None => match set("CONSUL_HTTP_TOKEN_FILE") {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        Error::Config(format!("cannot read CONSUL_HTTP_TOKEN_FILE {path}: {e}"))
                    })?;
                    Some(SecretToken::new(text.trim())).filter(|t| !t.expose().is_empty())
                }
                None => None,
            },
        };
        config.ca_cert = set("CONSUL_CACERT").map(PathBuf::from);
        Ok(config)
    }

    pub fn with_token(mut self, token: SecretToken) -> Self {
        self.token = Some(token);
        self
    }

    pub fn with_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// `http://host:port` or `https://host:port`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(crate) fn is_https(&self) -> bool {
        self.base_url.starts_with("https://")
    }

    /// Go's HTTP client never proxies loopback; reqwest would, if a proxy
    /// variable is set.
    pub(crate) fn is_loopback(&self) -> bool {
        let host_port = self.base_url.split_once("://").map_or("", |(_, rest)| rest);
        let host = match host_port.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => host_port,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<ClientConfig, Error> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ClientConfig::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_to_local_agent() {
        let config = from(&[]).unwrap();
        assert_eq!(config.base_url(), "http://127.0.0.1:8500");
        assert!(config.token.is_none() && config.is_loopback());
    }

    #[test]
    fn ssl_flag_and_schemes() {
        let config = from(&[
            ("CONSUL_HTTP_ADDR", "consul.local:8501"),
            ("CONSUL_HTTP_SSL", "true"),
        ])
        .unwrap();
        assert_eq!(config.base_url(), "https://consul.local:8501");
        assert!(!config.is_loopback());
        let config = from(&[("CONSUL_HTTP_ADDR", "https://10.0.0.1:8501/")]).unwrap();
        assert_eq!(config.base_url(), "https://10.0.0.1:8501");
        assert!(from(&[("CONSUL_HTTP_SSL", "maybe")]).is_err());
        assert!(from(&[("CONSUL_HTTP_ADDR", "unix:///tmp/consul.sock")]).is_err());
        assert!(ClientConfig::new("[::1]:8500").unwrap().is_loopback());
    }

    #[test]
    fn token_and_ca_from_env_never_shown() {
        let config = from(&[
            ("CONSUL_HTTP_TOKEN", "super-secret-token"),
            ("CONSUL_CACERT", "/etc/consul/ca.pem"),
        ])
        .unwrap();
        assert_eq!(
            config.token.as_ref().unwrap().expose(),
            "super-secret-token"
        );
        assert_eq!(
            config.ca_cert.as_deref(),
            Some("/etc/consul/ca.pem".as_ref())
        );
        assert!(!format!("{config:?}").contains("super-secret"));
    }

    #[test]
    fn token_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "file-token\n").unwrap();
        let config = from(&[("CONSUL_HTTP_TOKEN_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(config.token.unwrap().expose(), "file-token");
    }
}
