-- wrk script: every request is the JSON-RPC call that bench/hotswap/loadgen.py sends.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}'
