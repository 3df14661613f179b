using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Tests;

namespace DmaBroker.Benchmarks;

/// <summary>
/// What authentication costs claim+release calls, side by side in one run. One cycle, on a session
/// that is already open, is four unary calls, each through the access gate: CreateContainer,
/// SetContainer on the session's own free edu group, UnsetContainer, DestroyContainer. Each mode
/// has its own in-process broker on a loopback port the kernel picks, and the same number of
/// sessions, each on its own connection and group, cycling back to back so that the broker, not
/// one client's round trips, is the bottleneck. The modes: auth off (open mode) and a bearer token
/// (auth file) on http://, then TLS in open mode and mTLS (auth file, --client-ca) on https://, so
/// that mTLS / TLS shows what authentication adds to TLS and mTLS / off what TLS costs besides.
/// Rounds alternate the modes, rotating which goes first, and each mode's median round is reported.
/// </summary>
internal sealed class AuthSection : IBenchSection
{
    private const int CallsPerCycle = 4;
    private const int WarmupRounds = 2;
    private const int Sessions = 4;
    private const string Loopback = "http://127.0.0.1:0";
    private const string LoopbackTls = "https://127.0.0.1:0";
    private static readonly string[] EduDevices = ["0000:08:00.0", "0000:09:00.0", "0000:0a:00.0", "0000:0b:00.0"];

    public string Key => "auth";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var directory = Directory.CreateTempSubdirectory("dmabroker-auth-bench-").FullName;
        var modes = new List<Mode>();
        try
        {
            var pki = new TestPki(directory);
            var token = Convert.ToBase64String(RandomNumberGenerator.GetBytes(32));
            var authFile = Path.Combine(directory, "auth.json");
            await File.WriteAllTextAsync(authFile, AuthFile(token));
            string[] tls = ["--tls-cert", pki.ServerCertFile, "--tls-key", pki.ServerKeyFile];
            modes.Add(new Mode("auth off (open mode), http", await Host.StartBrokerAsync(Loopback), new BrokerClientOptions()));
            modes.Add(new Mode("bearer token (auth file), http", await Host.StartBrokerAsync(Loopback, "--auth-file", authFile),
                new BrokerClientOptions { BearerToken = token }));
            modes.Add(new Mode("TLS, auth off, https", await Host.StartBrokerAsync(LoopbackTls, tls),
                new BrokerClientOptions { TrustedAuthorities = pki.Authorities }));
            modes.Add(new Mode("mTLS client cert (auth file), https", await Host.StartBrokerAsync(LoopbackTls, [.. tls, "--auth-file", authFile, "--client-ca", pki.CaFile]),
                new BrokerClientOptions { TrustedAuthorities = pki.Authorities, ClientCertificate = pki.Client("bench") }));
            foreach (var mode in modes)
                await mode.OpenSessionsAsync(Sessions);

            // Warm-up rounds, not counted: the tiered JIT keeps recompiling for some 10 s of this load.
            var rounds = await Rounds.AlternateAsync(options, options.Quick ? 0 : WarmupRounds, [.. modes.Select(m => (Func<Task<(double, double)>>)(() => m.MeasureAsync(options.Seconds)))]);
            for (var i = 0; i < modes.Count; i++)
                modes[i].Rounds.AddRange(rounds[i]);
            return [Row(modes[1], modes[0]), Row(modes[3], modes[0]), Row(modes[3], modes[2])];
        }
        finally
        {
            foreach (var mode in modes)
                await mode.DisposeAsync();
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>Calls/s of <paramref name="measured"/> beside <paramref name="baseline"/>, with CPU µs per call (this process's: clients and brokers) in the detail.</summary>
    private static BenchRow Row(Mode measured, Mode baseline)
    {
        var row = Rounds.Row($"claim+release calls/s, {measured.Name}", [.. measured.Rounds.Select(r => r.CallsPerSecond)], baseline.Name,
            [.. baseline.Rounds.Select(r => r.CallsPerSecond)], r => Rounds.Format(r, 0, "calls/s"), note: $" ({CallsPerCycle} unary calls a cycle, {Sessions} sessions)");
        return row with
        {
            Detail = row.Detail + $"; CPU {measured.CpuPerCall:F1} vs {baseline.CpuPerCall:F1} µs/call ({Rounds.Percent(measured.CpuPerCall / baseline.CpuPerCall)})",
        };
    }

    /// <summary>The bearer token's and the client certificate's principals, among entries like docs/auth.example.json's.</summary>
    private static string AuthFile(string token) => $$"""
        {
          "principals": [
            { "name": "token:bench", "token_sha256": "{{Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(token)))}}", "roles": ["user"] },
            { "name": "cert:bench", "roles": ["user"] },
            { "name": "uid:*", "roles": ["user"] },
            { "name": "anonymous", "roles": ["viewer"] }
          ]
        }
        """;

    /// <summary>One way of calling: its broker, client options, sessions and the calls/s of each round.</summary>
    private sealed class Mode(string name, Host broker, BrokerClientOptions options) : IAsyncDisposable
    {
        private readonly List<(BrokerClient Client, BrokerSession Session, uint Group)> _workers = [];

        public string Name { get; } = name;
        public List<(double CallsPerSecond, double CpuPerCall)> Rounds { get; } = [];
        public double CallsPerSecond => Benchmarks.Rounds.Median(Rounds.Select(r => r.CallsPerSecond));
        public double CpuPerCall => Benchmarks.Rounds.Median(Rounds.Select(r => r.CpuPerCall));

        /// <summary>Opens <paramref name="count"/> sessions, each on its own connection and with its own edu group.</summary>
        public async Task OpenSessionsAsync(int count)
        {
            for (var i = 0; i < count; i++)
            {
                var client = BrokerClient.Connect(broker.Address, options);
                try
                {
                    var devices = await client.ListDevicesAsync();
                    var group = devices.Devices.Single(d => d.Address == EduDevices[i]).GroupId;
                    _workers.Add((client, await client.OpenSessionAsync($"auth-bench-{i}"), group));
                }
                catch
                {
                    client.Dispose();
                    throw;
                }
            }
        }

        /// <summary>Every session cycles until <paramref name="seconds"/> are up: completed calls per second, and the process's CPU µs per call.</summary>
        public async Task<(double CallsPerSecond, double CpuPerCall)> MeasureAsync(double seconds)
        {
            var deadline = TimeSpan.FromSeconds(seconds);
            using var process = Process.GetCurrentProcess();
            var cpu = process.TotalProcessorTime;
            var clock = Stopwatch.StartNew();
            var cycles = await Task.WhenAll(_workers.Select(w => Task.Run(async () =>
            {
                long done = 0;
                while (clock.Elapsed < deadline)
                {
                    var container = await w.Session.CreateContainerAsync(ContainerType.Type1V2);
                    await w.Session.SetContainerAsync(w.Group, container);
                    await w.Session.UnsetContainerAsync(w.Group);
                    await w.Session.Raw.Vfio.DestroyContainerAsync(new DestroyContainerRequest { ContainerId = container });
                    done++;
                }
                return done;
            })));
            var elapsed = clock.Elapsed.TotalSeconds;
            process.Refresh();
            var calls = cycles.Sum() * CallsPerCycle;
            return (calls / elapsed, (process.TotalProcessorTime - cpu).TotalMicroseconds / calls);
        }

        public async ValueTask DisposeAsync()
        {
            foreach (var (client, session, _) in _workers)
            {
                await session.DisposeAsync();
                client.Dispose();
            }
            options.ClientCertificate?.Dispose();
            await broker.DisposeAsync();
        }
    }
}
