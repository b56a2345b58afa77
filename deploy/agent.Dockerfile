# The sluice-agent image, made from the static binary `cargo xtask dist` builds: nothing
# is compiled here. dist copies this file into target/dist/image-agent/ next to the
# binary and an empty state/ directory; build from that context (a few MB):
#   cargo xtask dist && docker build -t sluice-agent target/dist/image-agent
# Run:
#   docker run -e APP_HOST=db.internal -e APP_PORT=5432 -e NAME=orders-db \
#     -e REGISTRATION_JWT=eyJ... -v sluice-agent:/var/lib/sluice-agent sluice-agent
# (deploy/docker-compose.yml is the same with a restart policy and a health check.)
# --chmod needs BuildKit, Docker's builder since 23.0 (DOCKER_BUILDKIT=1 before that).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --chown=0:0 --chmod=0755 sluice-agent /usr/local/bin/sluice-agent
# The state directory, owned by the agent's uid (65532, distroless "nonroot") with mode
# 0700: Docker copies an image directory's owner and mode into a fresh named volume
# mounted on it, so the agent can save its identity on first start. Without this line the
# volume is root's and the agent exits 2 ("STATE_DIR ... is not writable").
# tests/tests/dist.rs builds a root file system from these COPY lines and runs the agent in it.
COPY --chown=65532:65532 --chmod=0700 state/ /var/lib/sluice-agent/
ENV STATE_DIR=/var/lib/sluice-agent
# Before a final exit (1: refused for good, 2: bad configuration) wait 5 minutes, so a
# restart policy does not retry in a tight loop what cannot heal by itself.
ENV SLUICE_EXIT_DELAY_SECS=300
# The metrics and health listener, on the container's own loopback: `sluice-agent health`
# (the HEALTHCHECK below) asks its /readyz. Publish nothing; set another address to scrape.
ENV SLUICE_METRICS_LISTEN=127.0.0.1:9464
USER 65532:65532
VOLUME ["/var/lib/sluice-agent"]
# Healthy while the control session with the relay is up (/readyz), so `docker ps` shows
# an agent that runs but cannot reach the relay; `docker logs` says why.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/sluice-agent", "health"]
# SIGTERM lets running streams finish for up to SLUICE_DRAIN_TIMEOUT_SECS (30 s): give
# `docker stop` time for it (docker stop -t 40, compose stop_grace_period: 40s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice-agent"]
