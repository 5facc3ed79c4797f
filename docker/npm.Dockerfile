# npm: the node pool manager, plus fn-certs (the compose stack's one-shot `certs` service
# runs it to write the development PKI into a volume). Built by `make images`.
FROM scratch
LABEL fn.dataplane.image=npm
COPY rootfs/ /
# The certificates directory: owned by the fn user and closed to others, so a volume mounted
# here starts with these permissions and function code (a uid of its own per function, in
# no group of ours) cannot read the key.
COPY --chown=10001:10001 certs-root/ /
# The CA's directory, for the `certs` service alone (compose mounts the `issuer` volume here):
# owner-only, so the volume starts that way.
COPY --chown=10001:10001 issuer-root/ /
COPY bin/npm bin/fn-certs bin/fn-probe /usr/local/bin/
ENV PATH=/usr/local/bin
# Unprivileged. With FN_CONTROL_PLANE=docker it also needs the Docker socket's group
# (compose: group_add), which is root-equivalent on the host: see the README.
USER 10001:10001
EXPOSE 9120
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/fn-probe", "grpc", "127.0.0.1:9120", "--port-env", "FN_GRPC_PORT"]
ENTRYPOINT ["/usr/local/bin/npm"]
