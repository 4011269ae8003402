# syntax=docker/dockerfile:1
# grapheon-agent as a container image: the static musl binary alone on an empty base.
#
# The build stage runs on the builder's own platform and cross-compiles for the image's
# platform (linux/amd64, linux/arm64, linux/arm/v7) with scripts/build-release.sh, which
# installs the cross C compiler ring needs. The final stage holds nothing but the binary: its
# TLS roots are compiled in, and it needs no shell, libc or CA bundle.
#
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t grapheon-agent .
#
# How to run it on a host: docs/operating.md ("Container").

FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG TARGETARCH=amd64
ARG TARGETVARIANT=
WORKDIR /src
COPY Cargo.toml Cargo.lock VERSION build.rs ./
COPY src ./src
COPY scripts/build-release.sh ./scripts/
COPY scripts/lib ./scripts/lib
RUN case "$TARGETARCH$TARGETVARIANT" in \
        amd64) target=x86_64-unknown-linux-musl ;; \
        arm64) target=aarch64-unknown-linux-musl ;; \
        armv7) target=armv7-unknown-linux-musleabihf ;; \
        *) echo "unsupported platform: $TARGETARCH$TARGETVARIANT" >&2; exit 1 ;; \
    esac \
    && scripts/build-release.sh --targets "$target" --strict --no-smoke --no-pack --out /out \
    && cp "/out/$target/grapheon-agent" /grapheon-agent

FROM scratch
COPY --from=build /grapheon-agent /grapheon-agent
# Agent identity, API key and last snapshot: keep them across container restarts.
VOLUME ["/var/lib/grapheon-agent"]
ENTRYPOINT ["/grapheon-agent"]
