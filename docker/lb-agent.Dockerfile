# lb-agent: the HTTP front end. Built by `make images` from a context the Makefile prepares
# (target/docker-context): static binaries plus a tiny rootfs; nothing is pulled.
FROM scratch
LABEL fn.dataplane.image=lb-agent
COPY rootfs/ /
COPY --chown=10001:10001 certs-root/ /
COPY bin/lb-agent bin/fn-probe /usr/local/bin/
ENV PATH=/usr/local/bin
# Unprivileged: it only listens on a high port and reads the catalog and the certificates.
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/fn-probe", "http", "127.0.0.1:8080", "/health", "--port-env", "FN_PORT"]
ENTRYPOINT ["/usr/local/bin/lb-agent"]
