# sluice-agent as a small container. Build: docker build -t sluice-agent .
# Run:  docker run -e APP_HOST=db.internal -e APP_PORT=5432 -e NAME=orders-db \
#         -e REGISTRATION_JWT=eyJ... -v sluice-agent:/var/lib/sluice-agent sluice-agent
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Static glibc binary (kernel TLS support later needs glibc, not musl).
RUN RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p sluice-agent --bin sluice-agent

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/sluice-agent /usr/local/bin/sluice-agent
VOLUME ["/var/lib/sluice-agent"]
ENV STATE_DIR=/var/lib/sluice-agent
USER nonroot
ENTRYPOINT ["/usr/local/bin/sluice-agent"]
