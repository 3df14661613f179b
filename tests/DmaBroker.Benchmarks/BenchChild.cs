using System.Diagnostics;
using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Benchmarks;

/// <summary>
/// The client processes the sigkill and sessions benchmarks start (this program again, so nothing
/// else needs building):
/// <list type="bullet">
/// <item><c>hold &lt;address&gt; &lt;group&gt; &lt;port&gt;</c>: opens a session, claims the group,
/// connects a plain TCP socket to the benchmark's loopback port (whose end the benchmark times
/// beside the release), prints <c>holding</c> and waits to be killed.</item>
/// <item><c>load &lt;address&gt; &lt;sessions&gt; &lt;connections&gt;</c>: opens that many pinging
/// sessions spread over that many connections and prints <c>opened N in T ms</c>; then takes
/// commands on stdin: <c>check</c> prints <c>live N</c> (sessions not ended), <c>close</c> closes
/// every session and prints <c>closed in T ms</c>.</item>
/// </list>
/// </summary>
internal static class BenchChild
{
    /// <summary>The first argument that selects a child mode.</summary>
    public const string Mode = "__child";

    public static async Task RunAsync(string[] args)
    {
        switch (args)
        {
            case [Mode, "hold", var address, var group, var port]:
                await HoldAsync(address, uint.Parse(group, CultureInfo.InvariantCulture), int.Parse(port, CultureInfo.InvariantCulture));
                break;
            case [Mode, "load", var address, var sessions, var connections]:
                await LoadAsync(address, int.Parse(sessions, CultureInfo.InvariantCulture), int.Parse(connections, CultureInfo.InvariantCulture));
                break;
            default:
                throw new ArgumentException($"unknown child mode: {string.Join(' ', args)}");
        }
    }

    private static async Task HoldAsync(string address, uint group, int port)
    {
        using var client = BrokerClient.Connect(address);
        var session = await client.OpenSessionAsync("sigkill-holder");
        await session.SetContainerAsync(group, await session.CreateContainerAsync(ContainerType.Type1V2));
        using var socket = new System.Net.Sockets.TcpClient();
        await socket.ConnectAsync(System.Net.IPAddress.Loopback, port);
        Console.WriteLine($"holding {group} session {session.Id}");
        // Until killed (or the benchmark closes stdin).
        await Console.In.ReadToEndAsync();
        await session.DisposeAsync();
    }

    private static async Task LoadAsync(string address, int count, int connections)
    {
        var clients = Enumerable.Range(0, connections).Select(_ => BrokerClient.Connect(address)).ToArray();
        var sessions = new BrokerSession[count];
        var clock = Stopwatch.StartNew();
        await Parallel.ForEachAsync(Enumerable.Range(0, count), new ParallelOptions { MaxDegreeOfParallelism = 64 }, async (i, cancel) =>
            sessions[i] = await clients[i % connections].OpenSessionAsync(cancellationToken: cancel));
        Console.WriteLine($"opened {count} in {clock.Elapsed.TotalMilliseconds.ToString("F0", CultureInfo.InvariantCulture)} ms");
        while (await Console.In.ReadLineAsync() is { } command)
        {
            switch (command)
            {
                case "check":
                    Console.WriteLine($"live {sessions.Count(s => !s.Ended.IsCompleted)}");
                    break;
                case "close":
                    clock.Restart();
                    await Parallel.ForEachAsync(sessions, new ParallelOptions { MaxDegreeOfParallelism = 64 }, async (s, _) => await s.DisposeAsync());
                    Console.WriteLine($"closed in {clock.Elapsed.TotalMilliseconds.ToString("F0", CultureInfo.InvariantCulture)} ms");
                    break;
            }
        }
        foreach (var client in clients)
            client.Dispose();
    }
}
