//! Connecting to the coordinator the way a worker or the CLI does: a channel
//! (plain, or TLS with an optional client certificate) and a client that
//! puts the job token on every call.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::metadata::errors::InvalidMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::coordinator_client::CoordinatorClient;
use super::{AUTHORIZATION, BEARER_PREFIX};

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct TokenInterceptor {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for TokenInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenInterceptor(<redacted>)")
    }
}

impl TokenInterceptor {
    pub fn new(token: &str) -> Result<Self, InvalidMetadataValue> {
        let mut value: MetadataValue<_> = format!("{BEARER_PREFIX}{token}").parse()?;
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

/// A coordinator client that sends the job token.
pub type CoordinatorConnection = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// TLS towards the coordinator (PEM).
#[derive(Clone, Default)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate.
    pub ca_pem: Vec<u8>,
    /// A client certificate and key, when the coordinator requires one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check the coordinator's certificate against (default:
    /// the host of the address).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the job token cannot travel in a header (visible ASCII only)")]
    Token(#[from] InvalidMetadataValue),
    #[error("cannot connect to the coordinator at {address}: {source}")]
    Transport {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to `address` (`http://host:port`, or `https://...` with `tls`)
/// and returns a client whose calls carry `token`. Message limits match
/// the server's.
pub async fn connect(
    address: &str,
    token: &str,
    tls: Option<ClientTls>,
) -> Result<CoordinatorConnection, ConnectError> {
    let interceptor = TokenInterceptor::new(token)?;
    let transport = |source| ConnectError::Transport {
        address: address.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(transport)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        install_crypto_provider();
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = tls.domain {
            config = config.domain_name(domain);
        }
        endpoint = endpoint.tls_config(config).map_err(transport)?;
    }
    let channel = endpoint.connect().await.map_err(transport)?;
    Ok(CoordinatorClient::with_interceptor(channel, interceptor)
        .max_decoding_message_size(super::MAX_REPLY_BYTES)
        .max_encoding_message_size(super::MAX_REQUEST_BYTES))
}

/// Makes ring the process's TLS crypto provider unless one is set already.
/// (The dependency tree also holds aws-lc-rs, and with two candidates
/// rustls will not pick one itself.)
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interceptor_adds_a_bearer_token_marked_sensitive() {
        let mut interceptor = TokenInterceptor::new("secret-0123456789").unwrap();
        let request = interceptor.call(Request::new(())).unwrap();
        let value = request.metadata().get(AUTHORIZATION).unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer secret-0123456789");
        assert!(value.is_sensitive());
        assert_eq!(format!("{interceptor:?}"), "TokenInterceptor(<redacted>)");
        assert!(TokenInterceptor::new("bad\ntoken").is_err());
    }
}
