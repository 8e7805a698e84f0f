//! Unit tests of message parsing and quoting.

use super::*;

/// A listener on loopback that runs `answer` on the first connection.
async fn server(answer: impl FnOnce(tokio::net::TcpStream) + Send + 'static) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            answer(s);
        }
    });
    port
}

/// The error of a replication connection to 127.0.0.1:`port`.
async fn connect_error(port: u16) -> PgError {
    let conninfo = format!("host=127.0.0.1 port={port} user=dr sslmode=disable");
    match ReplicationConn::connect(&conninfo, "dr_test").await {
        Ok(_) => panic!("connected to something that is not PostgreSQL on port {port}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_dropped_connection_is_transient() {
    let port = server(drop).await;
    let e = connect_error(port).await;
    assert!(matches!(e, PgError::Connection { .. }), "{e:?}");
    assert!(e.is_transient(), "{e}");
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    // A port just freed: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let e = connect_error(port).await;
    assert!(matches!(e, PgError::Connection { .. }), "{e:?}");
    assert!(e.is_transient(), "{e}");
}

#[tokio::test]
async fn bytes_that_are_not_the_protocol_are_permanent() {
    let port = server(|s| {
        tokio::spawn(async move {
            let mut s = s;
            // 'Q' is a frontend message; no server sends it.
            let _ = s.write_all(b"Q\0\0\0\x04").await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
    })
    .await;
    let e = connect_error(port).await;
    assert!(matches!(e, PgError::Protocol { .. }), "{e:?}");
    assert!(!e.is_transient(), "{e}");
}

#[test]
fn server_errors_are_retried_by_sqlstate() {
    let err = |code: &str| PgError::Server {
        server: "db:5432".into(),
        what: "BASE_BACKUP".into(),
        severity: "FATAL".into(),
        code: code.into(),
        message: "m".into(),
    };
    // Shutdown, too many connections / senders, connection failure.
    for code in ["57P01", "53300", "08006"] {
        assert!(err(code).is_transient(), "{code}");
    }
    // No rights, bad password, no pg_hba entry, internal error.
    for code in ["42501", "28P01", "28000", "XX000"] {
        assert!(!err(code).is_transient(), "{code}");
    }
}

/// Found by the `replication` fuzz target: a message announcing 4 GiB
/// made the parser reserve 4 GiB.
#[test]
fn a_huge_announced_length_is_refused_before_any_allocation() {
    let mut rbuf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        next_frame(&mut rbuf),
        Err(PgError::Protocol { .. })
    ));
    let mut rbuf = BytesMut::from(&b"d\x10\x00\x00\x00"[..]);
    assert!(next_frame(&mut rbuf).is_err());
}
