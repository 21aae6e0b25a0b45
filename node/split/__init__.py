"""Split inference: one model's layers spread over this node and lending peers of its private mesh, run by
llama.cpp's RPC backend with every RPC byte carried inside our encrypted peer links.

  plan.py     which node takes which layers (pure)
  tools.py    the llama.cpp binaries install.sh builds (rpc-server, llama-server) and what they report
  lender.py   lending: rpc-server on loopback, started on demand, reachable only through a link tunnel
  borrower.py borrowing: loopback listeners tunnelled to the lenders, llama-server --rpc as a child
  service.py  the node's split service: both roles, wired to the runtime, the mesh and the guard
"""
