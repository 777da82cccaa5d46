"""Unary calls with a deadline from the Python grpcio client, as raw bytes.

Used by test/transport/deadlines.test.ts:

    python3 deadline_client.py --address 127.0.0.1:PORT --method /pkg.Service/Method \
        --timeout 0.0005 --authorization "Bearer good" HEX [HEX ...]

Sends each HEX-encoded request message with the given deadline (seconds) and
prints a JSON list with the status code name of each call ("OK" when answered).
"""

import argparse
import json

import grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--authorization", required=True)
    parser.add_argument("requests", nargs="+")
    args = parser.parse_args()

    codes = []
    with grpc.insecure_channel(args.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        call = channel.unary_unary(args.method)
        for req in args.requests:
            try:
                call(bytes.fromhex(req), timeout=args.timeout, metadata=(("authorization", args.authorization),))
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
    print(json.dumps(codes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
