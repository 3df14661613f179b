using System.Globalization;
using System.Text.RegularExpressions;
using DmaBroker.Protocol.V1;
using Xunit.Abstractions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// Many real client processes racing for the same groups, round after round: each group has
/// exactly one winner, the losers are told why, and when the winners die or are interrupted
/// every group comes back and nothing leaks.
/// </summary>
public sealed partial class ContentionTests(ITestOutputHelper output)
{
    private const int Rounds = 3;
    private const int RacersPerGroup = 3;
    private static readonly TimeSpan ProcessTimeout = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task Hold_RacersPerGroup_ExactlyOneWinnerEachRoundAndAllReleasedAfterKillOrInterrupt()
    {
        // A lease longer than the test: only noticing the death (SIGKILL) or the graceful close (SIGINT) releases a group.
        await using var broker = await LiveBroker.StartAsync("--lease-ttl-ms", "60000");
        await using var watch = await GroupWatch.StartAsync(broker.Client);
        var groups = FreeEduDevices.All.Select(d => d.Group).ToArray();
        var signals = new Dictionary<string, int> { ["SIGKILL"] = 0, ["SIGINT"] = 0 };
        var errnos = new Dictionary<string, int>();

        for (var round = 0; round < Rounds; round++)
        {
            var racers = new List<(uint Group, ClientProcess Process)>();
            try
            {
                foreach (var group in groups)
                {
                    for (var i = 0; i < RacersPerGroup; i++)
                        racers.Add((group, ClientProcess.StartDmactl(broker.Address, "hold", group.ToString(CultureInfo.InvariantCulture))));
                }
                var outcomes = await Task.WhenAll(racers.Select(r => OutcomeAsync(r.Group, r.Process)));

                // Exactly one winner per group; every loser exited 1 and said which errno it got.
                var winners = new Dictionary<uint, (ClientProcess Process, ulong Session)>();
                foreach (var o in outcomes)
                {
                    if (o.Session is { } session)
                    {
                        Assert.False(winners.ContainsKey(o.Group), $"round {round}: group {o.Group} has two winners: sessions {(winners.TryGetValue(o.Group, out var w) ? w.Session : 0)} and {session}");
                        winners[o.Group] = (o.Process, session);
                    }
                    else
                    {
                        var error = LoserError().Match(o.Process.Transcript);
                        Assert.True(o.ExitCode == 1 && error.Success,
                            $"round {round}: a loser for group {o.Group} should exit 1 with EINVAL or EPERM; {o.Process.Name} exited {o.ExitCode}:\n{o.Process.Transcript}");
                        errnos[error.Groups[1].Value] = errnos.GetValueOrDefault(error.Groups[1].Value) + 1;
                    }
                }
                Assert.Equal(groups, winners.Keys.Order());

                // The broker agrees: each group is owned by its winner's session, and the losers' sessions are gone.
                await watch.WaitUntilAsync($"round {round}: every group owned by its winner",
                    g => groups.All(id => g[id].OwnerKind == OwnerKind.User && g[id].OwnerSession == winners[id].Session));
                var held = await broker.StatsAsync();
                Assert.Equal((4u, 4u, 4u), (held.Sessions, held.Containers, held.UserOwnedGroups));

                // Winners go: some killed outright, some interrupted (Ctrl-C) and closing gracefully.
                var interrupted = new HashSet<uint>();
                foreach (var (group, (process, _)) in winners)
                {
                    if ((group + round) % 2 == 0)
                    {
                        process.Kill();
                        signals["SIGKILL"]++;
                    }
                    else
                    {
                        process.Interrupt();
                        interrupted.Add(group);
                        signals["SIGINT"]++;
                    }
                }
                await watch.WaitUntilAsync($"round {round}: every group released",
                    g => groups.All(id => g[id].OwnerKind == OwnerKind.None));
                foreach (var (group, (process, _)) in winners)
                {
                    var exit = await process.WaitForExitAsync(ProcessTimeout);
                    if (interrupted.Contains(group))
                        Assert.True(exit == 0 && process.Transcript.Contains($"released group {group}", StringComparison.Ordinal),
                            $"round {round}: interrupted {process.Name} should release group {group} and exit 0; exit {exit}:\n{process.Transcript}");
                    else
                        Assert.Equal(128 + 9, exit);
                }

                Assert.Empty(watch.Violations);
                Assert.All(groups, id => Assert.Equal((0u, 0ul, DomainKind.Default), (watch.Groups[id].OwnerCount, watch.Groups[id].OwnerSession, watch.Groups[id].Domain)));
                var after = await broker.StatsAsync();
                Assert.Equal((0u, 0u, 0u), (after.Sessions, after.Containers, after.UserOwnedGroups));
                output.WriteLine($"round {round}: {racers.Count} racers, winners {string.Join(", ", winners.Select(w => $"group {w.Key} -> session {w.Value.Session}"))}; sessions opened {after.SessionsOpened}, closed {after.SessionsClosed}");
            }
            finally
            {
                foreach (var (_, process) in racers)
                    await process.DisposeAsync();
            }
        }
        var final = await broker.StatsAsync();
        Assert.Equal((ulong)(Rounds * groups.Length * RacersPerGroup), final.SessionsClosed);
        output.WriteLine($"{Rounds} rounds of {groups.Length * RacersPerGroup} racers; losers got {string.Join(", ", errnos.Select(e => $"{e.Key} x{e.Value}"))}; winners stopped by {string.Join(", ", signals.Select(s => $"{s.Key} x{s.Value}"))}");
    }

    // A racer either prints "holding group G as session S" and keeps holding, or exits.
    private static async Task<(uint Group, ClientProcess Process, ulong? Session, int? ExitCode)> OutcomeAsync(uint group, ClientProcess process)
    {
        var line = await process.WaitForLineOrExitAsync("holding group", ProcessTimeout);
        if (line is null)
            return (group, process, null, await process.WaitForExitAsync(ProcessTimeout));
        var match = HoldingLine().Match(line);
        Assert.True(match.Success && match.Groups[1].Value == group.ToString(CultureInfo.InvariantCulture), $"{process.Name} printed '{line}'");
        return (group, process, ulong.Parse(match.Groups[2].Value, CultureInfo.InvariantCulture), null);
    }

    [GeneratedRegex(@"^holding group (\d+) as session (\d+) ")]
    private static partial Regex HoldingLine();

    [GeneratedRegex(@"stderr: dmactl: (EINVAL|EPERM): ")]
    private static partial Regex LoserError();
}
