//! TLS on the gRPC side, with client certificates required: a worker with a
//! certificate from the job's CA gets in; one without, or one speaking
//! plain HTTP/2, does not.

mod common;

use common::{Harness, TOKEN};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use swiftbrush_coordinator::TlsOptions;
use swiftbrush_proto::rpc::{self, ClientTls};

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// A certificate for `name` signed by `ca`, with its key (PEM).
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (Vec<u8>, Vec<u8>) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("sign");
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_configured() {
    let authority = ca("swiftbrush test CA");
    let (cert_pem, key_pem) = leaf(&authority, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let ca_pem = authority.pem().into_bytes();
    let tls = TlsOptions {
        cert_pem,
        key_pem,
        client_ca_pem: Some(ca_pem.clone()),
    };
    let dir = tempfile::tempdir().expect("dir");
    let h = Harness::start_with(None, dir, |o| o.tls = Some(tls)).await;
    let address = format!("https://localhost:{}", h.server.grpc_addr.port());

    let worker_cert = leaf(&authority, "worker-0", ExtendedKeyUsagePurpose::ClientAuth);
    let good = ClientTls {
        ca_pem: ca_pem.clone(),
        identity_pem: Some(worker_cert),
        domain: Some("localhost".to_owned()),
    };
    let mut client = rpc::connect(&address, TOKEN, Some(good))
        .await
        .expect("TLS connect");
    let reply = client
        .job_status(rpc::JobStatusRequest {})
        .await
        .expect("a client with a certificate gets in");
    assert_eq!(reply.into_inner().phase, rpc::JobPhase::Pending as i32);

    // A certificate from another CA, or none at all, is refused.
    let stranger = ca("someone else");
    let foreign = ClientTls {
        ca_pem: ca_pem.clone(),
        identity_pem: Some(leaf(
            &stranger,
            "worker-1",
            ExtendedKeyUsagePurpose::ClientAuth,
        )),
        domain: Some("localhost".to_owned()),
    };
    let anonymous = ClientTls {
        ca_pem,
        identity_pem: None,
        domain: Some("localhost".to_owned()),
    };
    for (what, tls) in [
        ("foreign certificate", foreign),
        ("no certificate", anonymous),
    ] {
        let refused = match rpc::connect(&address, TOKEN, Some(tls)).await {
            Err(_) => true,
            Ok(mut client) => client.job_status(rpc::JobStatusRequest {}).await.is_err(),
        };
        assert!(refused, "{what} got in");
    }
    // Plain HTTP/2 to a TLS port gets nowhere.
    let plain = format!("http://127.0.0.1:{}", h.server.grpc_addr.port());
    let refused = match rpc::connect(&plain, TOKEN, None).await {
        Err(_) => true,
        Ok(mut client) => client.job_status(rpc::JobStatusRequest {}).await.is_err(),
    };
    assert!(refused, "plain HTTP/2 got in");
    h.shutdown().await;
}
