"""Process plumbing every layer uses: threads, prefetch, write-behind, Ctrl-C (interrupts), injected faults.

Also failure messages, the default device, text tables, name rules, tensor fingerprints and progress output.
May import the standard library, torch, click, mmer_cl.errors, storage and registry (storage and registry import
runtime.faults and runtime.names back); nothing else of mmer_cl.
"""
