# sitecore-auth-proxy container image.
#
#   docker build -t sitecore-auth-proxy .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 --stop-timeout 40 \
#     -e SITECORE_CLIENT_ID -e SITECORE_CLIENT_SECRET -e PROXY_CLIENT_KEY sitecore-auth-proxy
#
# Build stage: the official Rust image on Debian 12, the same glibc as the runtime image. The
# crate needs only a C compiler (aws-lc-sys), which the image has.
ARG RUST_VERSION=1
FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# Dependency layer: build every dependency against stub targets, so that changes to src/ only
# rebuild the crate itself. The stubs mirror the targets Cargo.toml declares (the binary, the
# library and the [[bench]] hot_path); add a stub here when Cargo.toml gains a target or build.rs.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && echo 'fn main() {}' > benches/hot_path.rs \
 && cargo build --release --locked \
 && rm -rf src benches \
      target/release/sitecore-auth-proxy* \
      target/release/.fingerprint/sitecore-auth-proxy-* \
      target/release/deps/sitecore_auth_proxy-* \
      target/release/deps/libsitecore_auth_proxy-*

# The real sources. The fingerprints of the stub build were removed above, so the crate is
# always rebuilt here whatever the files' timestamps.
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked \
 && install -D -m 0755 target/release/sitecore-auth-proxy /out/sitecore-auth-proxy \
 && /out/sitecore-auth-proxy --version

# Runtime stage: distroless (glibc, libgcc, CA certificates; no shell, no package manager) as
# the numeric non-root user 65532. The binary is its own health check client, so no curl.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="sitecore-auth-proxy" \
      org.opencontainers.image.description="An authenticating reverse proxy for Sitecore's cloud APIs" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

COPY --from=builder /out/sitecore-auth-proxy /usr/local/bin/sitecore-auth-proxy
# The default configuration for containers: listens on 0.0.0.0:8080 with one inbound client key,
# admin listener on 0.0.0.0:9090. Mount a file or a ConfigMap over /etc/sitecore-auth-proxy/.
COPY deploy/docker/proxy.toml /etc/sitecore-auth-proxy/proxy.toml

ENV SITECORE_PROXY_CONFIG=/etc/sitecore-auth-proxy/proxy.toml \
    LOG_FORMAT=json \
    RUST_LOG=info

USER 65532:65532
WORKDIR /home/nonroot

# 8080: the proxy. 9090: the admin listener (/healthz, /readyz, /metrics, /status).
EXPOSE 8080 9090

# Liveness only (/healthz); readiness (/readyz) is for load balancers and Kubernetes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/sitecore-auth-proxy", "healthcheck", "--admin", "http://127.0.0.1:9090"]

# The proxy handles SIGTERM itself (readiness 503, stop accepting, drain for shutdown_grace, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sitecore-auth-proxy"]
CMD ["run"]
