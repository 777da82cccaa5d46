"""A Python gRPC client of Latchkey, as a customer's backend would write it.

Used by test/integration/real-clients.test.ts: the test generates the Python
stubs from proto/ with grpcio-tools into a temporary directory, runs this script
against the real server, and asserts on the JSON it prints.

    python3 identity_keys_client.py --gen-dir DIR --address 127.0.0.1:PORT \
        --root-key lkroot_... --external-id auth0|abc --api-id api_py

It creates an identity, creates two keys linked to it by external_id, reads
them back (GetKey, ListKeys by external_id, GetIdentity by external_id), makes
one call without authorization, and prints one JSON object on stdout.
"""

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-dir", required=True, help="directory of the generated latchkey/v1/*_pb2*.py")
    parser.add_argument("--address", required=True)
    parser.add_argument("--root-key", required=True)
    parser.add_argument("--external-id", required=True)
    parser.add_argument("--api-id", required=True)
    args = parser.parse_args()

    sys.path.insert(0, args.gen_dir)
    import grpc
    from google.protobuf import json_format, struct_pb2
    from latchkey.v1 import identity_service_pb2, identity_service_pb2_grpc, key_service_pb2, key_service_pb2_grpc

    auth = (("authorization", "Bearer " + args.root_key),)
    with grpc.insecure_channel(args.address) as channel:
        identities = identity_service_pb2_grpc.IdentityServiceStub(channel)
        keys = key_service_pb2_grpc.KeyServiceStub(channel)

        meta = struct_pb2.Struct()
        meta.update({"plan": "pro", "seats": 3})
        created = identities.CreateIdentity(
            identity_service_pb2.CreateIdentityRequest(external_id=args.external_id, meta=meta),
            metadata=auth,
            timeout=10,
        ).identity

        made = []
        for name in ("primary", "secondary"):
            res = keys.CreateKey(
                key_service_pb2.CreateKeyRequest(api_id=args.api_id, prefix="py", name=name, external_id=args.external_id),
                metadata=auth,
                timeout=10,
            )
            made.append(res)

        fetched = [keys.GetKey(key_service_pb2.GetKeyRequest(id=m.key.id), metadata=auth, timeout=10).key for m in made]
        listed = keys.ListKeys(key_service_pb2.ListKeysRequest(external_id=args.external_id), metadata=auth, timeout=10)
        by_external = identities.GetIdentity(
            identity_service_pb2.GetIdentityRequest(external_id=args.external_id), metadata=auth, timeout=10
        ).identity

        try:
            identities.GetIdentity(identity_service_pb2.GetIdentityRequest(external_id=args.external_id), timeout=10)
            unauthenticated = "OK"
        except grpc.RpcError as err:
            unauthenticated = err.code().name

    out = {
        "created_identity": {
            "id": created.id,
            "external_id": created.external_id,
            "meta": json_format.MessageToDict(created.meta),
        },
        "created_keys": [
            {
                "id": m.key.id,
                "plaintext": m.plaintext,
                "start": m.key.start,
                "name": m.key.name,
                "identity_id": m.key.identity_id,
                "external_id": m.key.external_id,
            }
            for m in made
        ],
        "fetched_keys": [
            {"id": k.id, "name": k.name, "identity_id": k.identity_id, "external_id": k.external_id, "api_id": k.api_id}
            for k in fetched
        ],
        "listed_key_ids": [k.id for k in listed.keys],
        "identity_by_external_id": {
            "id": by_external.id,
            "external_id": by_external.external_id,
            "meta": json_format.MessageToDict(by_external.meta),
        },
        "unauthenticated_call": unauthenticated,
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
