# The relay image (`sluice serve`), made from the static binary `cargo xtask dist`
# builds: nothing is compiled here. dist copies this file into target/dist/image-relay/
# next to the binary and an empty state/ directory; build from that context:
#   cargo xtask dist && docker build -t sluice target/dist/image-relay
# deploy/relay-compose.yml runs it with its volume and ports. The admin API stays on the
# container's loopback; run the CLI inside: docker exec sluice-relay sluice customers list
# --chmod needs BuildKit, Docker's builder since 23.0 (DOCKER_BUILDKIT=1 before that).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --chown=0:0 --chmod=0755 sluice /usr/local/bin/sluice
# The data directory (CA, keys, SQLite store), owned by the relay's uid (65532) with mode
# 0700, so a fresh named volume mounted here is writable on first start.
COPY --chown=65532:65532 --chmod=0700 state/ /var/lib/sluice/
ENV SLUICE_DATA_DIR=/var/lib/sluice
# Agents dial 8443; platform jobs connect to the resource ports, so bind them on all of
# the container's addresses (published by compose). Set SLUICE_PUBLIC_URL to the URL
# agents reach the relay at (it goes into registration JWTs and the relay certificate).
ENV SLUICE_AGENT_LISTEN=0.0.0.0:8443
ENV SLUICE_RESOURCE_BIND=0.0.0.0
USER 65532:65532
VOLUME ["/var/lib/sluice"]
EXPOSE 8443
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
