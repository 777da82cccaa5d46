# syntax=docker/dockerfile:1
# Latchkey container image: build with the full toolchain, run on a slim image as a
# non-root user. The API port serves gRPC, gRPC-Web and Connect (h2c and HTTP/1.1);
# Prometheus metrics are on their own port.
#
#   docker build -t latchkey .
#   docker run -p 8080:8080 -p 9464:9464 -v latchkey-data:/data latchkey
#
# See compose.yaml for the production shape (MongoDB + Redis). The first start writes
# the bootstrap root key to /data/bootstrap-root-key (mode 0600), not to the logs.
#
# CI replays these steps without Docker (.ci/prod-install: clean copy, npm ci, build,
# prune, start the pruned install with each store and rate-limit backend); it checks
# that the lines it replays are still here, so change both together.

FROM node:24-bookworm-slim AS build
WORKDIR /app
# better-sqlite3 compiles its native addon when no prebuilt binary fits.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
ENV npm_config_nodedir=/usr/local
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY gen ./gen
COPY src ./src
RUN npm run build \
 && npm prune --omit=dev --no-audit --no-fund

FROM node:24-bookworm-slim
ENV NODE_ENV=production \
    LATCHKEY_HOST=0.0.0.0 \
    LATCHKEY_PORT=8080 \
    LATCHKEY_METRICS_PORT=9464 \
    LATCHKEY_DATA_DIR=/data
RUN groupadd --system --gid 10001 latchkey \
 && useradd --system --uid 10001 --gid latchkey --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin latchkey \
 && mkdir -p /data \
 && chown latchkey:latchkey /data
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
USER 10001:10001
# The embedded store's SQLite database (unused when MONGODB_URI is set).
VOLUME ["/data"]
EXPOSE 8080 9464
# Node is PID 1 and handles SIGTERM itself: health goes NOT_SERVING, calls drain, usage flushes.
CMD ["node", "dist/src/cli.js", "serve"]
