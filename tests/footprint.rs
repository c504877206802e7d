//! What one connection costs before any byte arrives: the task future the accept loop spawns.
//! (The forwarding state is boxed separately and bounded in `splice`'s own test.)

#[tokio::test]
async fn connection_task_is_small() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let _c = std::net::TcpStream::connect(a).unwrap();
    let (s, peer) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpStream::from_std(s).unwrap();
    let config = sniplex::Config::parse("", std::path::Path::new("x")).unwrap();
    let gate = sniplex::limits::Gate::new();
    let (open, hs) = gate.admit(&config.limits).unwrap();
    let shared = std::sync::Arc::new(sniplex::conn::Shared {
        config: arc_swap::ArcSwap::from_pointee(config),
        pipes: Default::default(),
        forward: Default::default(),
        force_close: Default::default(),
        metrics: None,
        gate: gate.clone(),
    });
    let fut = sniplex::conn::handle(
        s,
        peer,
        shared,
        sniplex::conn::Admission {
            open,
            handshake: Some(hs),
            ip: None,
        },
    );
    let size = std::mem::size_of_val(&fut);
    eprintln!("connection task future: {size} bytes");
    assert!(size <= 2048, "connection task future is {size} bytes");
}
