"""Reading the results: job records, the leaderboard and the papers' reported numbers beside it, one
paper's table regenerated, the HTML report, maps exported in the MVTec layout, and ``harness
evaluate`` (another codebase's maps scored by the same metric engine).

Everything here reads records (or maps) from disk; nothing here runs a method.
"""
