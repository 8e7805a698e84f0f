//! A TLS server on 127.0.0.1 for tests of clients: it presents a
//! certificate the test made (`test_certificates`) and hands each accepted
//! connection to the test's handler.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// An accepted, TLS-terminated connection.
pub type Conn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Serves TLS with `cert` (PEM chain) and `key` from a thread and runtime
/// of its own, so synchronous tests that run `dr` can use it too; returns
/// the port. Connections whose handshake fails are dropped: refusing is
/// the client's business. The thread ends with the test process.
pub fn serve<F, Fut>(cert: &Path, key: &Path, handle: F) -> u16
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
    let key =
        PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, handle) = (acceptor.clone(), handle.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        handle(tls).await;
                    }
                });
            }
        });
    });
    port
}
