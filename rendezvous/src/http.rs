pub(crate) async fn serve(_l: tokio::net::TcpListener, _s: std::sync::Arc<crate::server::Shared>, _c: tokio_util::sync::CancellationToken) {}
