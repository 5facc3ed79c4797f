# pure-runner with the example functions (fn-hello, fn-echo, fn-sleep, fn-crash) in its
# FN_FUNCTIONS_DIR. Built by `make images`; also the image the npm's docker control plane
# provisions runners from.
FROM scratch
LABEL fn.dataplane.image=pure-runner
COPY rootfs/ /
COPY --chown=10001:10001 certs-root/ /
COPY bin/pure-runner bin/fn-isolate bin/fn-probe /usr/local/bin/
COPY functions/ /opt/fn/functions/
ENV PATH=/usr/local/bin FN_FUNCTIONS_DIR=/opt/fn/functions
# The table of function uids (FN_FUNCTION_UID_TABLE) in the container's /tmp, a tmpfs (the
# root is read-only, /run absent): every runner container has its own, as it has its own PID
# namespace and files, and a restarted container a new one.
ENV FN_FUNCTION_UID_TABLE=/tmp/fn-runner-uids/function-uids
# Root on purpose: function code is untrusted and the runner starts each function as a uid
# of its own (FN_FUNCTION_UIDS, 100000-165535), which needs setuid/setgid. Root here is a
# container root with a reduced capability set (see deploy/docker-compose.yml and the docker
# control plane). It reads the certificates (/certs, 0750 fn:fn) through CAP_DAC_OVERRIDE,
# which it keeps: `USER 0:0` names the group, so Docker gives it no supplementary groups
# (root's membership of fn in rootfs/etc/group does not apply). No function uid is in fn.
# Run it with an init as PID 1 (compose `init: true`, `docker run --init`): the runner
# reaps only its own children, not what its functions leave behind.
USER 0:0
EXPOSE 9190
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/fn-probe", "grpc", "127.0.0.1:9190", "--port-env", "FN_GRPC_PORT"]
ENTRYPOINT ["/usr/local/bin/pure-runner"]
