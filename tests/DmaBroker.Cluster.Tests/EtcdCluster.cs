using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// Real etcd members (Debian's <c>etcd</c>, 3.4) on loopback ports the OS chose, each with a
/// temporary data directory. Disposing kills every member by its pid and deletes the directories,
/// whatever the test's outcome.
/// </summary>
public sealed class EtcdCluster : IAsyncDisposable
{
    private static readonly TimeSpan StartupTimeout = TimeSpan.FromSeconds(60);
    // Printed by an etcd 3.4 member once it is ready and serves its clients.
    private const string Ready = "serving client traffic";

    private readonly List<Member> _members;
    // With peer links: each member's peer traffic comes in through a link of its own (its advertised peer URL).
    private readonly List<PeerLink> _links = [];

    private EtcdCluster(List<Member> members) => _members = members;

    /// <summary>Every member's client URL.</summary>
    public IReadOnlyList<Uri> Endpoints => [.. _members.Select(m => m.ClientUrl)];

    /// <summary>
    /// Starts <paramref name="size"/> members as one new cluster and returns once each serves clients.
    /// With <paramref name="peerLinks"/>, the members talk to each other through links a test can
    /// cut (<see cref="Isolate"/>), while their clients still reach them.
    /// </summary>
    public static async Task<EtcdCluster> StartAsync(int size = 1, bool peerLinks = false)
    {
        var token = "dmabroker-test-" + Guid.NewGuid().ToString("N");
        var members = Enumerable.Range(0, size).Select(i => new Member($"m{i}", new Uri($"http://127.0.0.1:{FreePort()}"),
            new Uri($"http://127.0.0.1:{FreePort()}"), Directory.CreateTempSubdirectory("dmabroker-etcd-").FullName)).ToList();
        var cluster = new EtcdCluster(members);
        try
        {
            if (peerLinks)
            {
                foreach (var m in members)
                {
                    var link = new PeerLink(m.PeerUrl);
                    cluster._links.Add(link);
                    m.AdvertisedPeerUrl = link.Endpoint;
                }
            }
            var initial = string.Join(",", members.Select(m => $"{m.Name}={m.AdvertisedPeerUrl.GetLeftPart(UriPartial.Authority)}"));
            foreach (var m in members)
                m.Start(token, initial);
            await Task.WhenAll(members.Select(m => m.ReadyAsync.WaitAsync(StartupTimeout)));
            return cluster;
        }
        catch
        {
            await cluster.DisposeAsync();
            throw;
        }
    }

    /// <summary>Kills member <paramref name="index"/> with SIGKILL, by its pid, and waits until it is gone.</summary>
    public async Task KillAsync(int index)
    {
        var process = _members[index].Process!;
        process.Kill();
        await process.WaitForExitAsync().WaitAsync(StartupTimeout);
    }

    /// <summary>
    /// Partitions member <paramref name="index"/> from the other members (started with peer links):
    /// no raft message passes either way, so it loses its leader while the others go on without it.
    /// Its clients still reach it.
    /// </summary>
    public void Isolate(int index)
    {
        var id = _members[index].Id;
        for (var i = 0; i < _links.Count; i++)
            _links[i].Block(i == index ? null : id);
    }

    /// <summary>Ends every partition: the members talk to each other again.</summary>
    public void Rejoin()
    {
        foreach (var link in _links)
            link.Unblock();
    }

    /// <summary>What member <paramref name="index"/> printed, for a failing test's message.</summary>
    public string Log(int index) => _members[index].Log;

    public async ValueTask DisposeAsync()
    {
        foreach (var m in _members)
            await m.DisposeAsync();
        foreach (var link in _links)
            await link.DisposeAsync();
    }

    private static int FreePort()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var port = ((IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop();
        return port;
    }

    private sealed class Member(string name, Uri clientUrl, Uri peerUrl, string dataDir) : IAsyncDisposable
    {
        private readonly TaskCompletionSource _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly System.Text.StringBuilder _log = new();

        public string Name { get; } = name;
        public Uri ClientUrl { get; } = clientUrl;
        public Uri PeerUrl { get; } = peerUrl;
        // Where the other members reach it: its peer URL, or its peer link's.
        public Uri AdvertisedPeerUrl { get; set; } = peerUrl;

        /// <summary>Its member id (hex) as it printed it once started.</summary>
        public string Id => System.Text.RegularExpressions.Regex.Match(Log, "\"local-member-id\":\"([0-9a-f]+)\"") is { Success: true } m
            ? m.Groups[1].Value
            : throw new InvalidOperationException($"etcd {Name} printed no member id:\n{Log}");
        public Process? Process { get; private set; }
        public Task ReadyAsync => _ready.Task;

        public string Log
        {
            get
            {
                lock (_log)
                    return _log.ToString();
            }
        }

        public void Start(string token, string initialCluster)
        {
            var client = ClientUrl.GetLeftPart(UriPartial.Authority);
            var peer = PeerUrl.GetLeftPart(UriPartial.Authority);
            var advertised = AdvertisedPeerUrl.GetLeftPart(UriPartial.Authority);
            var info = new ProcessStartInfo("etcd")
            {
                RedirectStandardError = true,
                RedirectStandardOutput = true,
                UseShellExecute = false,
            };
            foreach (var arg in new[]
            {
                "--name", Name, "--data-dir", dataDir,
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", advertised,
                "--initial-cluster", initialCluster, "--initial-cluster-state", "new", "--initial-cluster-token", token,
                "--logger", "zap", "--log-level", "info",
            })
            {
                info.ArgumentList.Add(arg);
            }
            var process = new Process { StartInfo = info, EnableRaisingEvents = true };
            process.ErrorDataReceived += (_, e) => Line(e.Data);
            process.OutputDataReceived += (_, e) => Line(e.Data);
            process.Exited += (_, _) => _ready.TrySetException(new InvalidOperationException($"etcd {Name} exited before it was ready:\n{Log}"));
            process.Start();
            Process = process;
            process.BeginErrorReadLine();
            process.BeginOutputReadLine();
        }

        private void Line(string? line)
        {
            if (line is null)
                return;
            lock (_log)
                _log.AppendLine(line);
            if (line.Contains(Ready, StringComparison.Ordinal))
                _ready.TrySetResult();
        }

        public async ValueTask DisposeAsync()
        {
            if (Process is { } p)
            {
                try
                {
                    if (!p.HasExited)
                        p.Kill();
                    await p.WaitForExitAsync().WaitAsync(StartupTimeout);
                }
                catch (InvalidOperationException)
                {
                    // never started
                }
                p.Dispose();
            }
            try
            {
                Directory.Delete(dataDir, recursive: true);
            }
            catch (IOException)
            {
                // a member still closing its files; the temp dir is cleaned by the OS
            }
        }
    }

    /// <summary>
    /// The way into one etcd member's peer port: every other member reaches it through here (it is the
    /// member's advertised peer URL), so a test can partition members. etcd's raft transport sends each
    /// request with <c>X-Server-From: &lt;member id&gt;</c>, and each member both dials the others (to
    /// receive their messages, and to post its own), so a member is cut off only when every link refuses
    /// the connections it dials and its own link refuses everyone's (<see cref="Isolate"/>).
    /// </summary>
    private sealed class PeerLink : IAsyncDisposable
    {
        private const int MaxHeader = 64 * 1024;
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly Uri _target;
        private readonly List<(TcpClient Client, string? From)> _connections = [];
        private readonly CancellationTokenSource _stop = new();
        private readonly Task _accept;
        // Refused: everyone (all), or the connections of one member (from).
        private volatile bool _all;
        private volatile string? _from;

        public PeerLink(Uri target)
        {
            _target = target;
            _listener.Start();
            Endpoint = new Uri($"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
            _accept = AcceptAsync();
        }

        /// <summary>The member's peer URL as the others know it.</summary>
        public Uri Endpoint { get; }

        /// <summary>Refuses the connections member <paramref name="from"/> dials (null: everyone's), and closes the ones open.</summary>
        public void Block(string? from)
        {
            (_all, _from) = (from is null, from);
            lock (_connections)
            {
                foreach (var c in _connections.Where(c => Refused(c.From)).ToList())
                {
                    c.Client.Dispose();
                    _connections.Remove(c);
                }
            }
        }

        /// <summary>Lets every connection through again.</summary>
        public void Unblock() => (_all, _from) = (false, null);

        private bool Refused(string? from) => _all || (from is not null && from == _from);

        private async Task AcceptAsync()
        {
            try
            {
                while (!_stop.IsCancellationRequested)
                    _ = ServeAsync(await _listener.AcceptTcpClientAsync(_stop.Token));
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
            }
        }

        private async Task ServeAsync(TcpClient inbound)
        {
            var outbound = new TcpClient();
            try
            {
                // The first request's header says which member dialed; Go keeps a connection to one member's own.
                var header = new MemoryStream();
                var buffer = new byte[16 * 1024];
                var stream = inbound.GetStream();
                while (header.Length < MaxHeader && !HeaderEnds(header))
                {
                    var read = await stream.ReadAsync(buffer, _stop.Token);
                    if (read == 0)
                        throw new IOException("closed before its header");
                    header.Write(buffer, 0, read);
                }
                var from = FromOf(System.Text.Encoding.ASCII.GetString(header.GetBuffer(), 0, (int)header.Length));
                lock (_connections)
                {
                    if (Refused(from))
                        throw new IOException("refused");
                    _connections.Add((inbound, from));
                    _connections.Add((outbound, from));
                }
                await outbound.ConnectAsync(_target.Host, _target.Port, _stop.Token);
                var target = outbound.GetStream();
                await target.WriteAsync(header.GetBuffer().AsMemory(0, (int)header.Length), _stop.Token);
                await Task.WhenAll(PumpAsync(stream, target), PumpAsync(target, stream));
            }
            catch (Exception e) when (e is OperationCanceledException or IOException or SocketException or ObjectDisposedException)
            {
            }
            finally
            {
                inbound.Dispose();
                outbound.Dispose();
                lock (_connections)
                    _connections.RemoveAll(c => c.Client == inbound || c.Client == outbound);
            }
        }

        private static bool HeaderEnds(MemoryStream header) =>
            header.Length >= 4 && System.Text.Encoding.ASCII.GetString(header.GetBuffer(), 0, (int)header.Length).Contains("\r\n\r\n", StringComparison.Ordinal);

        private static string? FromOf(string header)
        {
            foreach (var line in header.Split("\r\n"))
            {
                if (line.StartsWith("X-Server-From:", StringComparison.OrdinalIgnoreCase))
                    return line["X-Server-From:".Length..].Trim();
            }
            return null;
        }

        private async Task PumpAsync(NetworkStream from, NetworkStream to)
        {
            try
            {
                await from.CopyToAsync(to, _stop.Token);
            }
            finally
            {
                from.Dispose();
                to.Dispose();
            }
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            _listener.Stop();
            await _accept;
            lock (_connections)
            {
                foreach (var c in _connections)
                    c.Client.Dispose();
                _connections.Clear();
            }
            _stop.Dispose();
        }
    }
}
